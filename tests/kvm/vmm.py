"""A minimal VMM on ``/dev/kvm``: enough of a VM to be eoid's consumer for real.

One vCPU in 32-bit protected mode (flat segments, no paging) runs a guest assembled by
hand below. The guest programs its IOAPIC pin as level-triggered and unmasked, enables its
LAPIC, loads an IDT and halts with interrupts on. Its handler acks "the device" with a port
write (the VMM sees ``KVM_EXIT_IO`` and hands it to ``on_ack``, which the tests relay to a
sim device) and then ends the interrupt at its LAPIC (the EOI that KVM turns into a
resample, docs/intx-eoi.md §13). KVM's own irqchip (``KVM_CREATE_IRQCHIP``) decides when
the interrupt is injected and ended: nothing of that is simulated here.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import signal
import struct
import threading
from collections.abc import Callable
from typing import Any

# --- the uapi (include/uapi/linux/kvm.h) ---------------------------------------------------

_KVMIO = 0xAE


def _io(nr: int) -> int:
    return (_KVMIO << 8) | nr


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (_KVMIO << 8) | nr


_W, _R, _RW = 1, 2, 3

KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _ioc(_W, 0x46, 32)
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_IRQ_LINE = _ioc(_W, 0x61, 8)
KVM_GET_IRQCHIP = _ioc(_RW, 0x62, 520)
KVM_IRQFD = _ioc(_W, 0x76, 32)
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ioc(_R, 0x81, 144)
KVM_SET_REGS = _ioc(_W, 0x82, 144)
KVM_GET_SREGS = _ioc(_R, 0x83, 312)
KVM_SET_SREGS = _ioc(_W, 0x84, 312)

KVM_API_VERSION = 12
KVM_CAP_IRQCHIP = 0
KVM_CAP_IRQFD = 32
KVM_CAP_IRQFD_RESAMPLE = 82
KVM_IRQFD_FLAG_DEASSIGN = 1
KVM_IRQFD_FLAG_RESAMPLE = 2
KVM_IRQCHIP_IOAPIC = 2

EXIT_IO, EXIT_HLT, EXIT_MMIO, EXIT_SHUTDOWN, EXIT_FAIL_ENTRY, EXIT_INTR = 2, 5, 6, 8, 9, 10
EXIT_INTERNAL_ERROR = 17
_EXIT_NAMES = {0: "unknown", 1: "exception", EXIT_HLT: "hlt", EXIT_SHUTDOWN: "shutdown",
               EXIT_FAIL_ENTRY: "fail_entry", EXIT_INTERNAL_ERROR: "internal_error"}

# struct kvm_run: the fields before the exit union, then io or mmio in the union
_RUN_IMMEDIATE_EXIT = 1
_RUN_EXIT_REASON = 8
_RUN_UNION = 32


class _Segment(ctypes.Structure):
    _fields_ = (("base", ctypes.c_uint64), ("limit", ctypes.c_uint32),
                ("selector", ctypes.c_uint16), ("type", ctypes.c_uint8),
                ("present", ctypes.c_uint8), ("dpl", ctypes.c_uint8), ("db", ctypes.c_uint8),
                ("s", ctypes.c_uint8), ("l", ctypes.c_uint8), ("g", ctypes.c_uint8),
                ("avl", ctypes.c_uint8), ("unusable", ctypes.c_uint8),
                ("padding", ctypes.c_uint8))


class _Dtable(ctypes.Structure):
    _fields_ = (("base", ctypes.c_uint64), ("limit", ctypes.c_uint16),
                ("padding", ctypes.c_uint16 * 3))


class _Sregs(ctypes.Structure):
    _fields_ = (("cs", _Segment), ("ds", _Segment), ("es", _Segment), ("fs", _Segment),
                ("gs", _Segment), ("ss", _Segment), ("tr", _Segment), ("ldt", _Segment),
                ("gdt", _Dtable), ("idt", _Dtable), ("cr0", ctypes.c_uint64),
                ("cr2", ctypes.c_uint64), ("cr3", ctypes.c_uint64), ("cr4", ctypes.c_uint64),
                ("cr8", ctypes.c_uint64), ("efer", ctypes.c_uint64),
                ("apic_base", ctypes.c_uint64), ("interrupt_bitmap", ctypes.c_uint64 * 4))


class _Regs(ctypes.Structure):
    _fields_ = tuple((name, ctypes.c_uint64) for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11",
        "r12", "r13", "r14", "r15", "rip", "rflags"))


class _MemoryRegion(ctypes.Structure):
    _fields_ = (("slot", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("guest_phys_addr", ctypes.c_uint64), ("memory_size", ctypes.c_uint64),
                ("userspace_addr", ctypes.c_uint64))


class _Irqfd(ctypes.Structure):
    _fields_ = (("fd", ctypes.c_uint32), ("gsi", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("resamplefd", ctypes.c_uint32), ("pad", ctypes.c_uint8 * 16))


class _IrqLevel(ctypes.Structure):
    _fields_ = (("irq", ctypes.c_uint32), ("level", ctypes.c_uint32))


class _Irqchip(ctypes.Structure):
    _fields_ = (("chip_id", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("data", ctypes.c_uint8 * 512))


for _struct, _size in ((_Sregs, 312), (_Regs, 144), (_MemoryRegion, 32), (_Irqfd, 32),
                       (_IrqLevel, 8), (_Irqchip, 520)):
    assert ctypes.sizeof(_struct) == _size, _struct

_libc = ctypes.CDLL(None, use_errno=True)  # ctypes calls release the GIL: KVM_RUN blocks
_libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_libc.ioctl.restype = ctypes.c_int


def _ioctl(fd: int, request: int, arg: Any = 0) -> int:
    """One ioctl; ``arg`` an int or a ctypes structure (passed by reference)."""
    pointer = ctypes.addressof(arg) if isinstance(arg, ctypes.Structure) else arg
    result = int(_libc.ioctl(fd, request, pointer))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"ioctl {request:#x}: {os.strerror(err)}")
    return result


# --- the guest -------------------------------------------------------------------------------

READY_PORT = 0x510  # the guest is set up and about to halt with interrupts on
ACK_PORT = 0x511  # the handler acks its device: a 32-bit write of its running count
FAULT_PORT = 0x512  # an unexpected vector (an exception): the guest stops

GDT, IDTR, IDT, MAIN, HANDLER, SPURIOUS, FAULT = 0x500, 0x600, 0x800, 0x1000, 0x1100, 0x1180, \
    0x11C0
COUNTER = 0x2000  # the handler's running count, read by ``handled``
STACK_TOP = 0x8000
MEM_SIZE = 0x10000
IOAPIC_BASE, LAPIC_BASE = 0xFEC00000, 0xFEE00000
SPURIOUS_VECTOR = 0xFF


def _mov_mem_imm(address: int, value: int) -> bytes:
    """``mov dword [address], value`` (C7 /0, disp32)."""
    return b"\xc7\x05" + struct.pack("<II", address, value)


def main_code(gsi: int, vector: int) -> bytes:
    """The guest's set-up, then ``sti; hlt; jmp`` for ever::

        mov dword [LAPIC+0x80], 0          ; TPR 0: accept every vector
        mov dword [LAPIC+0x350], 0x10000   ; LVT LINT0 masked (no 8259 in the way)
        mov dword [LAPIC+0x360], 0x10000   ; LVT LINT1 masked
        mov dword [LAPIC+0xF0], 0x1FF      ; SVR: LAPIC software-enabled, spurious 0xFF
        lidt [IDTR]
        mov dword [IOAPIC], 0x10+2*gsi+1   ; IOREGSEL: the pin's high dword
        mov dword [IOAPIC+0x10], 0         ;   destination: APIC 0
        mov dword [IOAPIC], 0x10+2*gsi     ; IOREGSEL: the pin's low dword
        mov dword [IOAPIC+0x10], vector | 1<<15   ; fixed, physical, active high,
                                                  ; level-triggered, unmasked
        mov dx, READY_PORT
        mov al, 1
        out dx, al                         ; tell the VMM we are ready
      loop:
        sti
        hlt
        jmp loop
    """
    return b"".join((
        _mov_mem_imm(LAPIC_BASE + 0x80, 0),
        _mov_mem_imm(LAPIC_BASE + 0x350, 0x10000),
        _mov_mem_imm(LAPIC_BASE + 0x360, 0x10000),
        _mov_mem_imm(LAPIC_BASE + 0xF0, 0x100 | SPURIOUS_VECTOR),
        b"\x0f\x01\x1d" + struct.pack("<I", IDTR),  # lidt [IDTR]  (0F 01 /3)
        _mov_mem_imm(IOAPIC_BASE, 0x10 + 2 * gsi + 1),
        _mov_mem_imm(IOAPIC_BASE + 0x10, 0),
        _mov_mem_imm(IOAPIC_BASE, 0x10 + 2 * gsi),
        _mov_mem_imm(IOAPIC_BASE + 0x10, vector | 1 << 15),
        b"\x66\xba" + struct.pack("<H", READY_PORT),  # mov dx, READY_PORT
        b"\xb0\x01",  # mov al, 1
        b"\xee",  # out dx, al
        b"\xfb",  # loop: sti
        b"\xf4",  # hlt
        b"\xeb\xfc",  # jmp loop (rel8 -4: back to sti)
    ))


def handler_code() -> bytes:
    """The device's interrupt handler, as a driver's: service the device, then EOI::

        push eax
        push edx
        inc dword [COUNTER]
        mov eax, [COUNTER]
        mov dx, ACK_PORT
        out dx, eax                 ; ack the device (the VMM relays it)
        mov dword [LAPIC+0xB0], 0   ; EOI
        pop edx
        pop eax
        sti
        retf 4                      ; iret, for a handler that interrupts only the idle loop

    Not ``iret``: where KVM emulates the guest's privileged instructions (this host runs
    PVM, ``kvm_pvm``), a protected-mode IRET is one KVM's x86 emulator does not implement
    (``em_iret`` in arch/x86/kvm/emulate.c: real mode only), and the vCPU stops with an
    internal error. The idle loop runs with interrupts on, so "return to it and turn them
    on" is all IRET would do; ``sti`` holds interrupts off for one more instruction, the
    far return.
    """
    return b"".join((
        b"\x50",  # push eax
        b"\x52",  # push edx
        b"\xff\x05" + struct.pack("<I", COUNTER),  # inc dword [COUNTER]  (FF /0)
        b"\xa1" + struct.pack("<I", COUNTER),  # mov eax, [COUNTER]  (A1 moffs32)
        b"\x66\xba" + struct.pack("<H", ACK_PORT),  # mov dx, ACK_PORT
        b"\xef",  # out dx, eax
        _mov_mem_imm(LAPIC_BASE + 0xB0, 0),  # EOI
        b"\x5a",  # pop edx
        b"\x58",  # pop eax
        b"\xfb\xca\x04\x00",  # sti; retf 4
    ))


SPURIOUS_CODE = b"\xcf"  # iret: a spurious interrupt takes no EOI
# mov dx, FAULT_PORT; out dx, al; hlt; jmp hlt  (interrupts stay off: the guest is stopped)
FAULT_CODE = b"\x66\xba" + struct.pack("<H", FAULT_PORT) + b"\xee\xf4\xeb\xfd"


def _gate(offset: int) -> bytes:
    """A 32-bit interrupt gate (type 0xE, present, DPL 0) to ``offset`` in segment 0x08."""
    return struct.pack("<HHBBH", offset & 0xFFFF, 0x08, 0, 0x8E, offset >> 16)


def guest_image(gsi: int, vector: int) -> dict[int, bytes]:
    """Everything the guest needs in memory, by guest-physical address."""
    idt = b"".join(_gate(HANDLER if v == vector else SPURIOUS if v == SPURIOUS_VECTOR
                         else FAULT) for v in range(256))
    return {
        GDT: struct.pack("<QQQ", 0, 0x00CF9B000000FFFF, 0x00CF93000000FFFF),  # null, code, data
        IDTR: struct.pack("<HI", len(idt) - 1, IDT),
        IDT: idt,
        MAIN: main_code(gsi, vector),
        HANDLER: handler_code(),
        SPURIOUS: SPURIOUS_CODE,
        FAULT: FAULT_CODE,
    }


# --- availability ----------------------------------------------------------------------------

def kvm_unavailable(path: str = "/dev/kvm") -> str | None:
    """Why this host cannot run the guest (None: it can): no device, no permission, or a
    KVM without the in-kernel irqchip and resampling irqfds."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"{path}: {e.strerror}"
    try:
        if _ioctl(fd, KVM_GET_API_VERSION) != KVM_API_VERSION:
            return f"{path}: KVM API version is not {KVM_API_VERSION}"
        for cap, name in ((KVM_CAP_IRQCHIP, "KVM_CAP_IRQCHIP"), (KVM_CAP_IRQFD, "KVM_CAP_IRQFD"),
                          (KVM_CAP_IRQFD_RESAMPLE, "KVM_CAP_IRQFD_RESAMPLE")):
            if _ioctl(fd, KVM_CHECK_EXTENSION, cap) <= 0:
                return f"{path}: no {name}"
        try:
            os.close(_ioctl(fd, KVM_CREATE_VM, 0))
        except OSError as e:
            return f"{path}: KVM_CREATE_VM: {e.strerror}"
    except OSError as e:
        return f"{path}: {e.strerror}"
    finally:
        os.close(fd)
    return None


# --- the VM ----------------------------------------------------------------------------------

class GuestFault(RuntimeError):
    """The guest did what it never should (an exception, a triple fault, stray MMIO)."""


def _wake(signum: int, frame: object) -> None:
    """SIGUSR1 only has to interrupt ``KVM_RUN``."""


class Vm:
    """One VM with KVM's irqchip and the guest above, its vCPU on a thread of its own.

    ``on_ack(count)`` runs on the vCPU thread for each of the handler's port writes, with
    the vCPU stopped in the handler (after the injection, before its EOI): what it does
    happens before the guest ends the interrupt, as a device's ack does."""

    def __init__(self, gsi: int = 20, vector: int = 0x40,
                 on_ack: Callable[[int], None] | None = None) -> None:
        # GSI 16-23 reach only the IOAPIC (0-15 are wired to the 8259 too)
        self.gsi, self.vector, self.on_ack = gsi, vector, on_ack
        self.acks: list[int] = []  # the counts the handler wrote, in order
        self.faults: list[str] = []
        self.ready = threading.Event()
        self.stopped = threading.Event()
        self._alive = threading.Lock()
        self.closed = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.irqfds: list[tuple[int, int | None]] = []
        self._fds: list[int] = []
        self.kvm = self._own(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
        try:
            self.vm = self._own(_ioctl(self.kvm, KVM_CREATE_VM, 0))
            _ioctl(self.vm, KVM_CREATE_IRQCHIP)
            self.mem = mmap.mmap(-1, MEM_SIZE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self._mem_ref = ctypes.c_char.from_buffer(self.mem)
            _ioctl(self.vm, KVM_SET_USER_MEMORY_REGION, _MemoryRegion(
                slot=0, flags=0, guest_phys_addr=0, memory_size=MEM_SIZE,
                userspace_addr=ctypes.addressof(self._mem_ref)))
            for address, code in guest_image(gsi, vector).items():
                self.mem[address:address + len(code)] = code
            self.vcpu = self._own(_ioctl(self.vm, KVM_CREATE_VCPU, 0))
            size = _ioctl(self.kvm, KVM_GET_VCPU_MMAP_SIZE)
            self.run = mmap.mmap(self.vcpu, size, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE)
            self._protected_mode()
        except BaseException:
            self.close()
            raise

    def _own(self, fd: int) -> int:
        self._fds.append(fd)
        return fd

    def _protected_mode(self) -> None:
        sregs = _Sregs()
        _ioctl(self.vcpu, KVM_GET_SREGS, sregs)
        for name, selector, kind in (("cs", 0x08, 0xB), ("ds", 0x10, 0x3), ("es", 0x10, 0x3),
                                     ("fs", 0x10, 0x3), ("gs", 0x10, 0x3), ("ss", 0x10, 0x3)):
            seg = getattr(sregs, name)
            seg.base, seg.limit, seg.selector, seg.type = 0, 0xFFFFFFFF, selector, kind
            seg.present, seg.dpl, seg.db, seg.s, seg.l, seg.g, seg.avl = 1, 0, 1, 1, 0, 1, 0
            seg.unusable = 0
        sregs.gdt.base, sregs.gdt.limit = GDT, 3 * 8 - 1
        sregs.cr0 |= 1  # PE; paging stays off
        _ioctl(self.vcpu, KVM_SET_SREGS, sregs)
        regs = _Regs()
        regs.rip, regs.rsp, regs.rflags = MAIN, STACK_TOP, 0x2
        _ioctl(self.vcpu, KVM_SET_REGS, regs)

    # -- running ----------------------------------------------------------------------------

    def start(self, timeout: float = 5.0) -> Vm:
        """Run the vCPU (again, after ``stop``) and wait until the guest is ready for
        interrupts."""
        if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, signal.SIG_IGN, None):
            signal.signal(signal.SIGUSR1, _wake)  # main thread only: tests run there
        self._stopping = False
        self.run[_RUN_IMMEDIATE_EXIT] = 0
        self.stopped.clear()
        self._thread = threading.Thread(target=self._loop, name="vcpu0", daemon=True)
        self._thread.start()
        if not self.ready.wait(timeout):
            self.stop()
            raise GuestFault(f"the guest did not get ready within {timeout}s: {self.faults}")
        self.check()
        return self

    def _loop(self) -> None:
        try:
            while not self._stopping:
                try:
                    _ioctl(self.vcpu, KVM_RUN)
                except OSError as e:
                    if e.errno in (errno.EINTR, errno.EAGAIN):
                        continue
                    raise
                if not self._exit(struct.unpack_from("<I", self.run, _RUN_EXIT_REASON)[0]):
                    return
        except Exception as e:  # recorded, and raised by check()
            self.faults.append(f"vcpu: {e!r}")
        finally:
            with self._alive:
                self.stopped.set()

    def _exit(self, reason: int) -> bool:
        """Handle one exit; False stops the vCPU."""
        if reason == EXIT_IO:
            direction, size, port, count, offset = struct.unpack_from(
                "<BBHIQ", self.run, _RUN_UNION)
            data = bytes(self.run[offset:offset + size * count])
            if direction == 1 and port == ACK_PORT:
                value = int.from_bytes(data[:size], "little")
                self.acks.append(value)
                if self.on_ack is not None:
                    try:
                        self.on_ack(value)
                    except Exception as e:  # the test sees it in check()
                        self.faults.append(f"on_ack({value}): {e!r}")
                return True
            if direction == 1 and port == READY_PORT:
                self.ready.set()
                return True
            self.faults.append(f"guest fault: port {port:#x} "
                               f"{'out' if direction else 'in'} {data.hex()}")
            return False
        if reason == EXIT_MMIO:
            address, = struct.unpack_from("<Q", self.run, _RUN_UNION)
            self.faults.append(f"guest touched unmapped memory at {address:#x}")
            return False
        if reason == EXIT_INTR:
            return True
        detail = ""
        if reason == EXIT_INTERNAL_ERROR:
            suberror, ndata = struct.unpack_from("<II", self.run, _RUN_UNION)
            words = struct.unpack_from(f"<{min(ndata, 16)}Q", self.run, _RUN_UNION + 8)
            detail = f" suberror {suberror} data {[hex(w) for w in words]}"
        regs = _Regs()
        _ioctl(self.vcpu, KVM_GET_REGS, regs)
        self.faults.append(f"vcpu exit {_EXIT_NAMES.get(reason, reason)}{detail} "
                           f"at rip {regs.rip:#x}")
        return False

    def check(self) -> None:
        """Raise what went wrong in the guest or on the vCPU thread, if anything did."""
        if self.faults:
            raise GuestFault("; ".join(self.faults))

    @property
    def handled(self) -> int:
        """The handler's own count (guest memory)."""
        return int(struct.unpack_from("<I", self.mem, COUNTER)[0])

    def stop(self) -> None:
        """Stop the vCPU: ``immediate_exit`` for a thread about to enter ``KVM_RUN``, a
        signal for one inside it (halted guests block there)."""
        self._stopping = True
        thread = self._thread
        if thread is None:
            return
        self.run[_RUN_IMMEDIATE_EXIT] = 1
        while not self.stopped.wait(0.02):
            with self._alive:  # never signal a thread that has ended (its id may be reused)
                if not self.stopped.is_set() and thread.ident is not None:
                    signal.pthread_kill(thread.ident, signal.SIGUSR1)
        thread.join()

    # -- the interrupt controller -------------------------------------------------------------

    def irq_line(self, level: int) -> None:
        """Raise (1) or lower (0) the GSI from the VMM (``KVM_IRQ_LINE``)."""
        _ioctl(self.vm, KVM_IRQ_LINE, _IrqLevel(irq=self.gsi, level=level))

    def irqfd(self, fd: int, resamplefd: int | None = None) -> None:
        """Register ``fd`` as the GSI's irqfd, resampling into ``resamplefd`` if given."""
        _ioctl(self.vm, KVM_IRQFD, _Irqfd(
            fd=fd, gsi=self.gsi, flags=0 if resamplefd is None else KVM_IRQFD_FLAG_RESAMPLE,
            resamplefd=0 if resamplefd is None else resamplefd))
        self.irqfds.append((fd, resamplefd))

    def irqfd_deassign(self, fd: int) -> None:
        _ioctl(self.vm, KVM_IRQFD, _Irqfd(fd=fd, gsi=self.gsi, flags=KVM_IRQFD_FLAG_DEASSIGN))
        self.irqfds = [entry for entry in self.irqfds if entry[0] != fd]

    def ioapic(self) -> tuple[int, int]:
        """The IOAPIC's ``irr`` (pin levels) and the guest's redirection entry for its GSI."""
        chip = _Irqchip(chip_id=KVM_IRQCHIP_IOAPIC)
        _ioctl(self.vm, KVM_GET_IRQCHIP, chip)
        data = bytes(chip.data)
        irr, = struct.unpack_from("<I", data, 16)
        entry, = struct.unpack_from("<Q", data, 24 + 8 * self.gsi)
        return irr, entry

    # -- lifetime -----------------------------------------------------------------------------

    def close(self) -> None:
        """Destroy the VM, as when its VMM exits: KVM releases its irqfds (lowering the GSI)
        and signals no resamplefd (docs/intx-eoi.md §13.5). Closing twice does nothing."""
        if self.closed:
            return
        self.closed = True
        self.stop()
        if hasattr(self, "run"):
            self.run.close()
        if hasattr(self, "_mem_ref"):
            del self._mem_ref
            self.mem.close()
        for fd in reversed(self._fds):
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# IOAPIC redirection entry bits
ENTRY_REMOTE_IRR = 1 << 14
ENTRY_LEVEL = 1 << 15
ENTRY_MASKED = 1 << 16
