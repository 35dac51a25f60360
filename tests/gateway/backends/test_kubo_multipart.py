"""The Kubo adapter's one-piece multipart body parses back to the file it carries."""

from __future__ import annotations

import email.message
import email.parser
import os

from gateway.backends.blobs_kubo import multipart_file


def test_multipart_body_carries_the_file_exactly() -> None:
    data = os.urandom(200_000) + b"\r\n--" + os.urandom(50)
    body, content_type = multipart_file("batch.car", data, "application/vnd.ipld.car")
    boundary = content_type.split("boundary=", 1)[1]
    assert boundary.encode() not in data
    msg = email.parser.BytesParser().parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    parts = msg.get_payload()
    assert isinstance(parts, list)
    (part,) = parts
    assert isinstance(part, email.message.Message)
    assert part.get_content_type() == "application/vnd.ipld.car"
    assert part.get_param("name", header="content-disposition") == "file"
    assert part.get_filename() == "batch.car"
    assert part.get_payload(decode=True) == data
