"""Ed25519 signatures of a gallery manifest (PyNaCl), detached in ``manifest.sig``.

The manifest holds the size and sha256 of every shard file, so signing its exact bytes signs
the whole gallery. ``manifest.sig`` is JSON: ``{"algorithm": "ed25519", "public_key": hex,
"signature": hex}``; the public key in it is only a hint for error messages, never trusted.

Key files are hex text: ``<name>.key`` (the 32-byte secret seed, mode 0600) and
``<name>.pub`` (the 32-byte public key). Needs ``pynacl`` (``pip install "cmce[signing]"``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import CmceError, SignatureError
from .gallery_format import MANIFEST_FILE

__all__ = [
    "SIGNATURE_FILE",
    "SignatureError",
    "generate_keys",
    "load_public_key",
    "load_secret_key",
    "sign_manifest",
    "verify_manifest",
]

SIGNATURE_FILE = "manifest.sig"
ALGORITHM = "ed25519"
KEY_BYTES = 32


def _nacl():
    try:
        import nacl.exceptions
        import nacl.signing
    except ImportError as exc:
        raise ImportError(
            'gallery signatures need PyNaCl: pip install "cmce[signing]" (or pynacl)'
        ) from exc
    return nacl.signing, nacl.exceptions


def _key_bytes(key: str | bytes | os.PathLike[str], what: str) -> bytes:
    """32 key bytes from raw bytes, a hex string, or a file holding the hex string."""
    if isinstance(key, bytes):
        raw = key
    else:
        text = str(key).strip()
        path = Path(text).expanduser()
        if len(text) != 2 * KEY_BYTES and path.is_file():
            text = path.read_text(encoding="utf-8").strip()
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raise SignatureError(
                f"{what} {str(key)!r:.80}: neither {2 * KEY_BYTES} hex digits nor a key file"
            ) from None
    if len(raw) != KEY_BYTES:
        raise SignatureError(f"{what}: {len(raw)} bytes, an Ed25519 key has {KEY_BYTES}")
    return raw


def load_public_key(key: str | bytes | os.PathLike[str]) -> bytes:
    """A public key (32 bytes) from bytes, hex or a ``.pub`` file."""
    return _key_bytes(key, "public key")


def load_secret_key(key: str | bytes | os.PathLike[str]) -> bytes:
    """A secret key seed (32 bytes) from bytes, hex or a ``.key`` file."""
    return _key_bytes(key, "secret key")


def generate_keys(base: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write a new key pair to ``<base>.key`` (mode 0600) and ``<base>.pub``; both paths."""
    signing, _ = _nacl()
    secret_path, public_path = Path(f"{base}.key"), Path(f"{base}.pub")
    for p in (secret_path, public_path):
        if p.exists():
            raise CmceError(f"{p} exists; choose another name or remove it first")
    key = signing.SigningKey.generate()
    fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(key.encode().hex() + "\n")
    public_path.write_text(key.verify_key.encode().hex() + "\n", encoding="utf-8")
    return secret_path, public_path


def sign_manifest(folder: str | os.PathLike[str], secret_key: str | bytes) -> Path:
    """Sign ``folder/manifest.json`` as it is now; write and return ``folder/manifest.sig``."""
    signing, _ = _nacl()
    folder = Path(folder)
    data = (folder / MANIFEST_FILE).read_bytes()
    key = signing.SigningKey(load_secret_key(secret_key))
    record = {
        "algorithm": ALGORITHM,
        "public_key": key.verify_key.encode().hex(),
        "signature": key.sign(data).signature.hex(),
    }
    path = folder / SIGNATURE_FILE
    tmp = path.with_name(f".{SIGNATURE_FILE}.tmp")
    tmp.write_text(json.dumps(record, sort_keys=True, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def verify_manifest(
    folder: str | os.PathLike[str], manifest_bytes: bytes, public_key: str | bytes
) -> None:
    """Check ``manifest_bytes`` against ``folder/manifest.sig`` and the trusted ``public_key``.

    Raises SignatureError when the signature file is missing or malformed, made with another
    key, or does not match the bytes (a tampered manifest).
    """
    signing, exceptions = _nacl()
    trusted = load_public_key(public_key)
    path = Path(folder) / SIGNATURE_FILE
    if not path.is_file():
        raise SignatureError(
            f"{SIGNATURE_FILE}: missing in {folder}; a public key was given, so unsigned "
            "galleries are refused"
        )
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        algorithm, signature = record["algorithm"], bytes.fromhex(record["signature"])
        hint = str(record.get("public_key", "?"))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise SignatureError(f"{SIGNATURE_FILE}: malformed ({exc})") from exc
    if algorithm != ALGORITHM:
        raise SignatureError(f"{SIGNATURE_FILE}: algorithm {algorithm!r}, expected {ALGORITHM!r}")
    try:
        signing.VerifyKey(trusted).verify(manifest_bytes, signature)
    except (exceptions.BadSignatureError, ValueError) as exc:
        other = "" if hint == trusted.hex() else f" (signed with key {hint[:16]}..)"
        raise SignatureError(
            f"{SIGNATURE_FILE}: the signature does not match {MANIFEST_FILE} and public key "
            f"{trusted.hex()[:16]}..{other}: the gallery was changed after signing, or signed "
            "by someone else"
        ) from exc
