"""``mixoe keygen`` and ``mixoe export --sign``: keys for signing bundles (models.contract.trust)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from models.contract.trust import TrustError, generate_key, load_private_key, load_public_keys
from training.cli import main as mixoe


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(tmp_path: Path, capsys: Any) -> None:
    assert mixoe(["keygen", str(tmp_path / "signing")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "signing.pub")
    assert os.stat(tmp_path / "signing").st_mode & 0o777 == 0o600
    private, (public,) = load_private_key(tmp_path / "signing"), load_public_keys([tmp_path / "signing.pub"])
    public.verify(private.sign(b"manifest"), b"manifest")  # raises unless the two belong together
    with pytest.raises(TrustError, match="signing already exists; refusing to overwrite a key"):
        generate_key(tmp_path / "signing")


def test_export_with_an_unreadable_signing_key_fails_in_one_line_before_any_work(tmp_path: Path, capsys: Any) -> None:
    (tmp_path / "not-a-key").write_text("hello")
    assert mixoe(["export", str(tmp_path / "no-run"), "--sign", str(tmp_path / "not-a-key")]) == 2
    error = capsys.readouterr().err
    assert error == f"mixoe: error: {tmp_path / 'not-a-key'} is not an Ed25519 private key: expected PEM or 32 raw bytes\n"
