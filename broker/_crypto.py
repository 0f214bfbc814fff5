"""The raw primitives, and the only module that touches them.

Callers use `broker.envelope.seal` / `open_envelope` and `broker.directory`;
this module holds Ed25519, HPKE (RFC 9180) key wrapping and AES-256-GCM, plus
the raw encodings of the keys, so that the rest of trm never handles a
primitive directly.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from enum import StrEnum

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

CONTENT_KEY_BYTES = 32
NONCE_BYTES = 12
SIGNATURE_BYTES = 64


class Suite(StrEnum):
    """HPKE suites a recipient's encryption key may name in the directory."""

    MLKEM768_X25519 = "mlkem768x25519-hkdfsha256-aes256gcm"
    """Default: post-quantum hybrid, for data that must stay secret for decades."""
    X25519 = "x25519-hkdfsha256-aes256gcm"
    """Classical, selectable per key for peers that cannot yet do ML-KEM."""

    @property
    def post_quantum(self) -> bool:
        """True if the suite's KEM includes ML-KEM, so a quantum computer alone cannot break it."""
        return self is Suite.MLKEM768_X25519


_HPKE = {
    Suite.MLKEM768_X25519: hpke.Suite(
        hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM
    ),
    Suite.X25519: hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
}

# Raw encodings: ML-KEM-768 private key as its 64-byte seed, public as 1184
# bytes; X25519 as 32 bytes each. The hybrid concatenates ML-KEM then X25519.
_MLKEM_SEED = 64
_MLKEM_PUBLIC = 1184
_X25519 = 32


class CryptoError(Exception):
    """A primitive failed; callers translate it into a TrmError."""


# --- signatures ----------------------------------------------------------------


def new_signing_key() -> Ed25519PrivateKey:
    """A fresh Ed25519 key."""
    return Ed25519PrivateKey.generate()


def signing_key_from_raw(raw: bytes) -> Ed25519PrivateKey:
    """The Ed25519 private key with this 32-byte seed."""
    return Ed25519PrivateKey.from_private_bytes(raw)


def verify_key_from_raw(raw: bytes) -> Ed25519PublicKey:
    """The Ed25519 public key with these 32 bytes."""
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as e:
        raise CryptoError("not an Ed25519 public key") from e


def raw_private(key: Ed25519PrivateKey) -> bytes:
    """The 32-byte seed of an Ed25519 key."""
    return key.private_bytes_raw()


def raw_public(key: Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of an Ed25519 public key."""
    return key.public_bytes_raw()


def sign(key: Ed25519PrivateKey, data: bytes) -> bytes:
    """An Ed25519 signature over `data`."""
    return key.sign(data)


def verify(key: Ed25519PublicKey, signature: bytes, data: bytes) -> None:
    """Return if `signature` is valid over `data`, else raise CryptoError."""
    try:
        key.verify(signature, data)
    except InvalidSignature as e:
        raise CryptoError("signature does not verify") from e


# --- HPKE key encapsulation -------------------------------------------------------


@dataclass(frozen=True)
class DecryptionKey:
    """A participant's private HPKE key of one suite."""

    suite: Suite
    raw: bytes

    def public(self) -> EncryptionKey:
        """The matching public key."""
        if self.suite is Suite.X25519:
            pub = x25519.X25519PrivateKey.from_private_bytes(self.raw).public_key()
            return EncryptionKey(self.suite, pub.public_bytes_raw())
        kem = mlkem.MLKEM768PrivateKey.from_seed_bytes(self.raw[:_MLKEM_SEED])
        ecdh = x25519.X25519PrivateKey.from_private_bytes(self.raw[_MLKEM_SEED:])
        return EncryptionKey(
            self.suite, kem.public_key().public_bytes_raw() + ecdh.public_key().public_bytes_raw()
        )


@dataclass(frozen=True)
class EncryptionKey:
    """A participant's public HPKE key of one suite."""

    suite: Suite
    raw: bytes


def new_decryption_key(suite: Suite = Suite.MLKEM768_X25519) -> DecryptionKey:
    """A fresh HPKE private key of `suite`."""
    ecdh = x25519.X25519PrivateKey.generate().private_bytes_raw()
    if suite is Suite.X25519:
        return DecryptionKey(suite, ecdh)
    return DecryptionKey(suite, os.urandom(_MLKEM_SEED) + ecdh)


def check_encryption_key(key: EncryptionKey) -> None:
    """Raise CryptoError unless `key.raw` is a valid public key of its suite."""
    _public_object(key)


def _public_object(key: EncryptionKey) -> x25519.X25519PublicKey | hpke.MLKEM768X25519PublicKey:
    try:
        if key.suite is Suite.X25519:
            return x25519.X25519PublicKey.from_public_bytes(key.raw)
        if len(key.raw) != _MLKEM_PUBLIC + _X25519:
            raise CryptoError("wrong length for an ML-KEM-768+X25519 public key")
        return hpke.MLKEM768X25519PublicKey(
            mlkem.MLKEM768PublicKey.from_public_bytes(key.raw[:_MLKEM_PUBLIC]),
            x25519.X25519PublicKey.from_public_bytes(key.raw[_MLKEM_PUBLIC:]),
        )
    except ValueError as e:
        raise CryptoError(f"not a {key.suite} public key") from e


# Cached: expanding an ML-KEM key from its seed costs more than a whole unwrap,
# and a participant opens every envelope with the same few keys.
@functools.lru_cache(maxsize=64)
def _private_object(
    key: DecryptionKey,
) -> x25519.X25519PrivateKey | hpke.MLKEM768X25519PrivateKey:
    try:
        if key.suite is Suite.X25519:
            return x25519.X25519PrivateKey.from_private_bytes(key.raw)
        if len(key.raw) != _MLKEM_SEED + _X25519:
            raise CryptoError("wrong length for an ML-KEM-768+X25519 private key")
        return hpke.MLKEM768X25519PrivateKey(
            mlkem.MLKEM768PrivateKey.from_seed_bytes(key.raw[:_MLKEM_SEED]),
            x25519.X25519PrivateKey.from_private_bytes(key.raw[_MLKEM_SEED:]),
        )
    except ValueError as e:
        raise CryptoError(f"not a {key.suite} private key") from e


def wrap(key: EncryptionKey, secret: bytes, info: bytes) -> bytes:
    """HPKE base-mode single-shot encryption of `secret` to `key`: enc || ct."""
    return _HPKE[key.suite].encrypt(secret, _public_object(key), info)


def unwrap(key: DecryptionKey, wrapped: bytes, info: bytes) -> bytes:
    """Undo `wrap`; raise CryptoError if it was not wrapped for this key and info."""
    try:
        return _HPKE[key.suite].decrypt(wrapped, _private_object(key), info)
    except (InvalidTag, ValueError) as e:
        raise CryptoError("key unwrap failed") from e


# --- content encryption ------------------------------------------------------------


def new_content_key() -> bytes:
    """A fresh AES-256 key for one payload."""
    return AESGCM.generate_key(bit_length=8 * CONTENT_KEY_BYTES)


def encrypt(content_key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM under a fresh random nonce: nonce || ciphertext || tag."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(content_key).encrypt(nonce, plaintext, aad)


def decrypt(content_key: bytes, sealed: bytes, aad: bytes) -> bytes:
    """Undo `encrypt`; raise CryptoError if anything was altered."""
    if len(sealed) < NONCE_BYTES + 16:
        raise CryptoError("ciphertext too short")
    try:
        return AESGCM(content_key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], aad)
    except (InvalidTag, ValueError) as e:
        raise CryptoError("payload decryption failed") from e
