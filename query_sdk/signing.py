"""Ed25519 signatures of a gallery manifest (PyNaCl), detached in ``manifest.sig``.

The manifest holds the size and sha256 of every shard file, so signing its exact bytes signs
the whole gallery. ``manifest.sig`` is JSON: ``{"algorithm": "ed25519", "public_key": hex,
"signature": hex}``; the public key in it is only a hint for error messages, never trusted.
It is read bounded (4 KiB) and checked by ``SIGNATURE_SPEC``, published as
``query_sdk/schemas/manifest-sig.schema.json``.

Key files are hex text: ``<name>.key`` (the 32-byte secret seed, mode 0600) and
``<name>.pub`` (the 32-byte public key). Needs ``pynacl`` (``pip install "cmce[signing]"``).
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import CmceError, SignatureError
from .fileio import read_json, read_regular_file, write_bytes_atomic, write_json_atomic
from .gallery_format import MANIFEST_FILE, SIGNATURE_FILE, read_manifest_bytes
from .manifest import Enum, Obj, Str, json_schema, validate

__all__ = [
    "SIGNATURE_FILE",
    "SignatureError",
    "generate_keys",
    "load_public_key",
    "load_secret_key",
    "sign_manifest",
    "verify_manifest",
    "SIGNATURE_SCHEMA",
]

ALGORITHM = "ed25519"
KEY_BYTES = 32
#: a signature file is three short fields; anything bigger is not one
MAX_SIGNATURE_BYTES = 4096
SIGNATURE_SPEC = Obj(
    {
        "algorithm": Enum([ALGORITHM]),
        "public_key": Str(
            pattern=f"^[0-9a-f]{{{2 * KEY_BYTES}}}$",
            what=f"{2 * KEY_BYTES} lowercase hex digits",
            doc="the signer's key: a hint for error messages, never trusted",
        ),
        "signature": Str(pattern="^[0-9a-f]{128}$", what="128 lowercase hex digits"),
    },
    optional=("public_key",),
)

#: the published JSON Schema of ``manifest.sig``
SIGNATURE_SCHEMA = json_schema(
    SIGNATURE_SPEC,
    name="manifest-sig.schema.json",
    title="cmce gallery manifest.sig",
    description="A detached Ed25519 signature of the exact bytes of manifest.json.",
)


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
            data = read_regular_file(path, 8 * KEY_BYTES, f"{what} file", SignatureError)
            text = data.decode("ascii", "replace").strip()
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
    write_bytes_atomic(public_path, (key.verify_key.encode().hex() + "\n").encode("ascii"))
    return secret_path, public_path


def sign_manifest(folder: str | os.PathLike[str], secret_key: str | bytes) -> Path:
    """Sign ``folder/manifest.json`` as it is now; write and return ``folder/manifest.sig``."""
    signing, _ = _nacl()
    folder = Path(folder)
    data = read_manifest_bytes(folder)
    key = signing.SigningKey(load_secret_key(secret_key))
    record = {
        "algorithm": ALGORITHM,
        "public_key": key.verify_key.encode().hex(),
        "signature": key.sign(data).signature.hex(),
    }
    path = folder / SIGNATURE_FILE
    write_json_atomic(path, record)
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
    record = validate(
        SIGNATURE_SPEC,
        read_json(path, "signature file", SignatureError, max_bytes=MAX_SIGNATURE_BYTES),
        str(path),
        SignatureError,
    )
    signature, hint = bytes.fromhex(record["signature"]), record.get("public_key", "?")
    try:
        signing.VerifyKey(trusted).verify(manifest_bytes, signature)
    except (exceptions.BadSignatureError, ValueError) as exc:
        other = "" if hint == trusted.hex() else f" (signed with key {hint[:16]}..)"
        raise SignatureError(
            f"{SIGNATURE_FILE}: the signature does not match {MANIFEST_FILE} and public key "
            f"{trusted.hex()[:16]}..{other}: the gallery was changed after signing, or signed "
            "by someone else"
        ) from exc
