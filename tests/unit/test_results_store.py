"""DirectoryResultStore: round trips, listing, deletion, and names that cannot escape."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpufleet.results import DirectoryResultStore, OutputFile, safe_name, sanitize_name

PNG = b"\x89PNG\r\n\x1a\nfake"


@pytest.fixture
def store(tmp_path: Path) -> DirectoryResultStore:
    return DirectoryResultStore(tmp_path / "results")


async def test_put_get_open_round_trip(store: DirectoryResultStore) -> None:
    stored = await store.put("task-1", "probe_00001_.png", PNG, "image/png")
    assert stored == OutputFile("probe_00001_.png", len(PNG), "image/png")
    assert await store.get("task-1", "probe_00001_.png") == PNG
    path = await store.open("task-1", "probe_00001_.png")
    assert path.read_bytes() == PNG
    assert path.parent == store.root / "task-1"


async def test_list_is_sorted_with_sizes_and_content_types(store: DirectoryResultStore) -> None:
    await store.put("t", "b.mp4", b"12345")
    await store.put("t", "a.png", PNG)
    listed = await store.list("t")
    assert [(f.filename, f.size, f.content_type) for f in listed] == [
        ("a.png", len(PNG), "image/png"),
        ("b.mp4", 5, "video/mp4"),
    ]
    assert not any(p.name.endswith(".part") for p in (store.root / "t").iterdir())


async def test_put_replaces_a_file_of_the_same_name(store: DirectoryResultStore) -> None:
    await store.put("t", "x.png", b"old")
    await store.put("t", "x.png", b"new!")
    assert await store.get("t", "x.png") == b"new!"
    assert [f.size for f in await store.list("t")] == [4]


async def test_missing_outputs(store: DirectoryResultStore) -> None:
    assert await store.list("nothing") == []
    with pytest.raises(FileNotFoundError):
        await store.get("nothing", "x.png")
    with pytest.raises(FileNotFoundError):
        await store.open("nothing", "x.png")


async def test_delete_removes_everything_and_is_idempotent(store: DirectoryResultStore) -> None:
    await store.put("t", "a.png", PNG)
    await store.put("t", "b.png", PNG)
    await store.put("other", "c.png", PNG)
    assert await store.delete("t") == 2
    assert await store.delete("t") == 0
    assert await store.list("t") == []
    assert [f.filename for f in await store.list("other")] == ["c.png"]


@pytest.mark.parametrize(
    "name",
    ["../escape.png", "a/b.png", "..", ".", "", ".hidden", "a\\b.png", "x\x00.png",
     "/etc/passwd", "a" * 201],
)
async def test_unsafe_names_are_refused(store: DirectoryResultStore, name: str) -> None:
    with pytest.raises(ValueError, match="unsafe"):
        await store.put("t", name, b"x")
    with pytest.raises(ValueError, match="unsafe"):
        await store.put(name, "ok.png", b"x")
    with pytest.raises(ValueError, match="unsafe"):
        await store.get("t", name)
    assert not (store.root.parent / "escape.png").exists()


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("probe_00001_.png", "probe_00001_.png"),
        ("sub/dir/x.png", "sub_dir_x.png"),
        ("../../etc/passwd", "etc_passwd"),
        (".hidden", "hidden"),
        ("", "output"),
        ("ünïcode name.png", "n_code name.png"),
    ],
)
def test_sanitize_name_always_returns_a_safe_name(raw: str, clean: str) -> None:
    assert sanitize_name(raw) == clean
    assert safe_name(sanitize_name(raw)) == clean
