"""MLLP framing (pure)."""

from __future__ import annotations

import pytest

from gateway.mllp.framing import Discarded, Frame, FrameDecoder, Oversize, frame

MSG = (
    b"MSH|^~\\&|LIS|HOSPA|GATEWAY|ALLIANCE|20260315113000||ORU^R01^ORU_R01|C-1|P|2.5.1\r"
    b"PID|1||X^^^A^MR\r"
)


@pytest.mark.parametrize("split", [1, 2, 3, 7, 50, len(MSG) + 1, len(MSG) + 2])
def test_frames_split_anywhere(split: int) -> None:
    data = frame(MSG) + frame(b"second")
    decoder = FrameDecoder(1024)
    events = decoder.feed(data[:split]) + decoder.feed(data[split:])
    assert events == [Frame(MSG), Frame(b"second")]
    assert not decoder.in_frame


def test_bytes_before_start_block_are_discarded_and_reported() -> None:
    events = FrameDecoder().feed(b"garbage\r\n" + frame(MSG) + b"xx")
    assert events == [Discarded(9), Frame(MSG), Discarded(2)]


def test_oversize_frame_is_reported_then_decoder_resyncs() -> None:
    decoder = FrameDecoder(max_size=100, head_bytes=20)
    big = frame(b"MSH|" + b"x" * 300)
    events = decoder.feed(big[:150]) + decoder.feed(big[150:] + frame(b"ok"))
    assert events[0] == Oversize(b"MSH|" + b"x" * 16, 100)
    assert events[-1] == Frame(b"ok")
