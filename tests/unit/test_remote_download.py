"""``tasks submit --outputs``: files are saved byte for byte, whatever their content type,
and only under the folder asked for."""

from __future__ import annotations

from pathlib import Path

import httpx
import respx

from gpufleet.remote import Remote, _download

URL = "http://gpufleet.test"


@respx.mock
def test_outputs_are_saved_as_sent_even_json_ones(tmp_path: Path) -> None:
    body = b'{"positive": "a cat",  "seed": 1}\n'  # not re-serialized: kept as sent
    respx.get(f"{URL}/api/v1/tasks/t1/outputs/meta.json").mock(
        return_value=httpx.Response(200, content=body,
                                    headers={"content-type": "application/json"}))
    respx.get(f"{URL}/api/v1/tasks/t1/outputs/img.png").mock(
        return_value=httpx.Response(200, content=b"\x89PNG...",
                                    headers={"content-type": "image/png"}))
    task = {"id": "t1", "result": {"outputs": [{"filename": "meta.json"},
                                               {"filename": "img.png"}]}}
    _download(Remote(URL, "k"), task, tmp_path / "out")
    assert (tmp_path / "out" / "meta.json").read_bytes() == body
    assert (tmp_path / "out" / "img.png").read_bytes() == b"\x89PNG..."


@respx.mock
def test_an_output_name_cannot_leave_the_folder(tmp_path: Path) -> None:
    asked = respx.get(f"{URL}/api/v1/tasks/t2/outputs/..%2F..%2Fevil.png").mock(
        return_value=httpx.Response(200, content=b"x", headers={"content-type": "image/png"}))
    task = {"id": "t2", "result": {"outputs": [{"filename": "../../evil.png"}]}}
    _download(Remote(URL, "k"), task, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["evil.png"]
    assert not (tmp_path / "evil.png").exists()
    assert asked.called  # the name went to gpufleet quoted, not resolved into another path
