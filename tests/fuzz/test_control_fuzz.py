"""The control-socket fuzzer's bounded campaign (CI): 5,000 messages from uid 65534."""

from __future__ import annotations

from tests.fuzz.control_socket import run_campaign


def test_a_bounded_fuzz_campaign_leaves_the_daemon_whole() -> None:
    report = run_campaign(5000)
    assert report.messages == 5000
    assert report.failures == []
    assert (report.crashes, report.tracebacks, report.unanswered) == (0, 0, 0)
    assert report.replies == report.messages
    assert report.daemon_fds_after == report.daemon_fds_before
    assert report.reconciled_batches == report.batches
