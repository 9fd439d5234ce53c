"""Archives: accepted layouts, and every unsafe or malformed shape refused without extracting."""

from __future__ import annotations

import gzip
import io
import tarfile
import zipfile

import pytest
import torch

from adapters_store import (
    ConfigMissingError,
    FileTooLargeError,
    Limits,
    TensorMissingError,
    TooManyArchiveMembersError,
    UnsafeArchiveError,
    parse_archive,
    parse_directory,
)
from tests.adapters_store.conftest import spec_for

GPT2 = spec_for("gpt2")
BOMB_BYTES = 200 * 1024 * 1024


def _adapter_files(adapter_dir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in adapter_dir.iterdir() if p.is_file()}


def make_tar(members: dict[str, bytes], *, gz: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def make_zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _tar_with(info: tarfile.TarInfo, extra: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in extra.items():
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
        tar.addfile(info)
    return buf.getvalue()


@pytest.fixture
def files(peft_adapter):
    return _adapter_files(peft_adapter("gpt2", "p_tuning_mlp"))


@pytest.fixture
def expected(peft_adapter):
    return parse_directory(peft_adapter("gpt2", "p_tuning_mlp"), spec=GPT2).embeddings


EXTRAS = {"README.md": b"# hi", "tokenizer.json": b"{broken", "training_args.bin": b"\x80evil"}


@pytest.mark.parametrize("name", ["a.tar.gz", "a.tgz", "a.zip", "a.tar"])
@pytest.mark.parametrize("folder", ["", "my-adapter/", "./"])
def test_archive_layouts_parse_like_the_directory(name, folder, files, expected):
    members = {folder + k: v for k, v in {**files, **EXTRAS}.items()}
    if name.endswith(".zip"):
        data = make_zip(members)
    else:
        data = make_tar(members, gz=not name.endswith(".tar"))

    parsed = parse_archive(data, archive_name=name, spec=GPT2)

    torch.testing.assert_close(parsed.embeddings, expected, rtol=0, atol=0)


def test_archive_from_a_path(files, expected, tmp_path):
    path = tmp_path / "upload.tgz"
    path.write_bytes(make_tar(files))
    for source in (path, str(path)):
        parsed = parse_archive(source, archive_name="upload.tgz", spec=GPT2)
        torch.testing.assert_close(parsed.embeddings, expected)


def test_bin_weights_in_an_archive(tiny_model_dirs, tmp_path, expected):
    from tests.factories import make_peft_model

    make_peft_model(tiny_model_dirs["gpt2"], "p_tuning_mlp").save_pretrained(
        tmp_path, safe_serialization=False)
    parsed = parse_archive(make_zip(_adapter_files(tmp_path)), archive_name="a.zip", spec=GPT2)
    torch.testing.assert_close(parsed.embeddings, expected)


def test_adapter_at_top_level_wins_over_checkpoint_folders(files, expected, peft_adapter):
    other = _adapter_files(peft_adapter("gpt2", "prompt_tuning"))
    members = {**files, **{f"checkpoint-100/{k}": v for k, v in other.items()}}
    parsed = parse_archive(make_tar(members), archive_name="a.tgz", spec=GPT2)
    torch.testing.assert_close(parsed.embeddings, expected)


def test_two_adapter_folders_are_ambiguous(files):
    members = {**{f"a/{k}": v for k, v in files.items()}, **{f"b/{k}": v for k, v in files.items()}}
    with pytest.raises(UnsafeArchiveError, match="several adapters"):
        parse_archive(make_zip(members), archive_name="a.zip", spec=GPT2)


def test_config_too_deep_is_missing(files):
    members = {f"x/y/{k}": v for k, v in files.items()}
    with pytest.raises(ConfigMissingError, match="missing from the archive"):
        parse_archive(make_tar(members), archive_name="a.tar.gz", spec=GPT2)


def test_archive_without_weights_is_reported(files):
    with pytest.raises(TensorMissingError, match="weights file is missing"):
        parse_archive(make_zip({"adapter_config.json": files["adapter_config.json"]}),
                      archive_name="a.zip", spec=GPT2)


@pytest.mark.parametrize("bad", ["/etc/adapter_config.json", "../adapter_config.json",
                                 "a/../../adapter_config.json", "C:/x/README.md"])
@pytest.mark.parametrize("kind", ["tgz", "zip"])
def test_escaping_paths_are_refused(bad, kind, files):
    members = {**files, bad: b"{}"}
    if kind == "zip":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for name, data in members.items():
                info = zipfile.ZipInfo(name)
                info.filename = name  # keep it as is; ZipInfo would not normalize it anyway
                zf.writestr(info, data)
        data = buf.getvalue()
    else:
        data = make_tar(members)
    with pytest.raises(UnsafeArchiveError, match="absolute path|'..' path component"):
        parse_archive(data, archive_name=f"a.{kind}", spec=GPT2)


@pytest.mark.parametrize("member_type", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_tar_links_are_refused(member_type, files):
    info = tarfile.TarInfo("adapter_model.safetensors")
    info.type, info.linkname = member_type, "/etc/passwd"
    with pytest.raises(UnsafeArchiveError, match="is a link"):
        parse_archive(_tar_with(info, {"adapter_config.json": files["adapter_config.json"]}),
                      archive_name="a.tgz", spec=GPT2)


@pytest.mark.parametrize("member_type", [tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE])
def test_tar_devices_are_refused(member_type, files):
    info = tarfile.TarInfo("dev")
    info.type = member_type
    with pytest.raises(UnsafeArchiveError, match="device or special file"):
        parse_archive(_tar_with(info, files), archive_name="a.tgz", spec=GPT2)


def test_zip_symlinks_are_refused(files):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("adapter_config.json", files["adapter_config.json"])
        link = zipfile.ZipInfo("adapter_model.safetensors")
        link.create_system = 3
        link.external_attr = 0o120777 << 16
        zf.writestr(link, "/etc/passwd")
    with pytest.raises(UnsafeArchiveError, match="is a link"):
        parse_archive(buf.getvalue(), archive_name="a.zip", spec=GPT2)


@pytest.mark.parametrize("kind", ["tgz", "zip"])
def test_too_many_members_are_refused(kind, files):
    members = {**files, **{f"junk{i}.txt": b"" for i in range(20)}}
    data = make_zip(members) if kind == "zip" else make_tar(members)
    with pytest.raises(TooManyArchiveMembersError, match="more than 16 members"):
        parse_archive(data, archive_name=f"a.{kind}", spec=GPT2)


class _Zeros(io.RawIOBase):
    def __init__(self, n: int) -> None:
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), self.left)
        b[:n] = bytes(n)
        self.left -= n
        return n


@pytest.fixture(scope="module")
def gzip_bomb(peft_adapter) -> bytes:
    """A .tar.gz whose README.md is 200 MB of zeros (about 200 KB compressed)."""
    files = _adapter_files(peft_adapter("gpt2", "p_tuning_mlp"))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("README.md")
        info.size = BOMB_BYTES
        tar.addfile(info, _Zeros(BOMB_BYTES))
    return buf.getvalue()


def _bytes_read(monkeypatch, cls: type) -> list[int]:
    """From now on, the sizes of what each cls.read call returns (decompressed bytes)."""
    sizes: list[int] = []
    real_read = cls.read

    def read(self, *args, **kwargs):
        data = real_read(self, *args, **kwargs)
        sizes.append(len(data))
        return data

    monkeypatch.setattr(cls, "read", read)
    return sizes


def test_gzip_bomb_stops_at_the_decompressed_limit(gzip_bomb, monkeypatch):
    assert len(gzip_bomb) < 2 * 1024 * 1024
    decompressed = _bytes_read(monkeypatch, gzip.GzipFile)
    with pytest.raises(FileTooLargeError, match="decompresses to more than 4194304 bytes"):
        parse_archive(gzip_bomb, archive_name="bomb.tar.gz", spec=GPT2,
                      limits=Limits(max_decompressed_bytes=4 * 1024 * 1024))
    assert 0 < sum(decompressed) <= 4 * 1024 * 1024 + 1  # of 200 MB: it stopped at the limit


def test_gzip_bomb_in_a_wanted_member_stops_at_the_file_limit(files):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tar:
        info = tarfile.TarInfo("adapter_model.safetensors")
        info.size = 8 * 1024 * 1024
        tar.addfile(info, _Zeros(info.size))
    with pytest.raises(FileTooLargeError, match="above the 1048576 limit"):
        parse_archive(buf.getvalue(), archive_name="b.tgz", spec=GPT2,
                      limits=Limits(max_file_bytes=1024 * 1024))


def test_zip_bomb_is_refused(files, monkeypatch):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.writestr("adapter_config.json", files["adapter_config.json"])
        with zf.open("adapter_model.safetensors", "w", force_zip64=True) as member:
            chunk = bytes(1024 * 1024)
            for _ in range(BOMB_BYTES // len(chunk)):
                member.write(chunk)
    assert len(buf.getvalue()) < 2 * 1024 * 1024
    decompressed = _bytes_read(monkeypatch, zipfile.ZipExtFile)
    with pytest.raises(FileTooLargeError):
        parse_archive(buf.getvalue(), archive_name="bomb.zip", spec=GPT2,
                      limits=Limits(max_decompressed_bytes=4 * 1024 * 1024))
    assert sum(decompressed) <= 4 * 1024 * 1024  # of 200 MB: refused before the limit


def test_zip_member_read_is_capped_even_if_headers_lie(files, monkeypatch):
    """With the header check out of the way, the streaming counter alone stops the bomb."""
    data = make_zip({**files, "adapter_model.safetensors": bytes(8 * 1024 * 1024)})
    real = zipfile.ZipFile.infolist

    def lying_infolist(self):
        infos = real(self)
        for info in infos:
            info.file_size = min(info.file_size, 10)  # what a forged header would claim
        return infos

    monkeypatch.setattr(zipfile.ZipFile, "infolist", lying_infolist)
    with pytest.raises((FileTooLargeError, UnsafeArchiveError)):
        parse_archive(data, archive_name="a.zip", spec=GPT2,
                      limits=Limits(max_decompressed_bytes=1024 * 1024))


def test_archive_itself_above_the_limit_is_refused(files):
    data = make_zip(files)
    with pytest.raises(FileTooLargeError, match="above this server's limit"):
        parse_archive(data, archive_name="a.zip", spec=GPT2,
                      limits=Limits(max_decompressed_bytes=len(data) - 1))


@pytest.mark.parametrize("name", ["a.tar.gz", "a.zip", "a.tar"])
def test_corrupt_archives_are_refused(name, files):
    good = make_zip(files) if name.endswith(".zip") else make_tar(files, gz=name.endswith(".gz"))
    for data in (b"definitely not an archive" * 40, good[:600]):  # 600: inside member one
        with pytest.raises(UnsafeArchiveError, match="corrupt"):
            parse_archive(data, archive_name=name, spec=GPT2)


def test_unknown_archive_type_is_refused(files):
    with pytest.raises(UnsafeArchiveError, match=r"\.tar\.gz, \.tgz, \.tar, \.zip"):
        parse_archive(make_zip(files), archive_name="a.rar", spec=GPT2)
