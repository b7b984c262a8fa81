"""Pure callback cryptography for Feishu/Lark and DingTalk: signatures, decryption, and the encryption fakes need.

Owns bytes-in, bytes-out transforms with no I/O, clocks or HTTP; it does not decide what a failure means to a caller.

    CryptoError
     ├── BadSignature      the signature does not match the request
     └── Undecryptable     wrong key, corrupt base64, bad padding or a malformed plaintext
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import struct

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes


class CryptoError(Exception):
    """A callback could not be authenticated or read. Messages never contain keys or signatures."""


class BadSignature(CryptoError):
    pass


class Undecryptable(CryptoError):
    pass


# ---- shared AES-CBC + PKCS#7 ------------------------------------------------------------------------------


def _cbc_encrypt(key: bytes, iv: bytes, plaintext: bytes, block_bits: int) -> bytes:
    padder = padding.PKCS7(block_bits).padder()
    padded = padder.update(plaintext) + padder.finalize()
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return encryptor.update(padded) + encryptor.finalize()


def _cbc_decrypt(key: bytes, iv: bytes, ciphertext: bytes, block_bits: int) -> bytes:
    if not ciphertext or len(ciphertext) % 16:
        raise Undecryptable("ciphertext is not a whole number of AES blocks")
    decryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    padded = decryptor.update(ciphertext) + decryptor.finalize()
    unpadder = padding.PKCS7(block_bits).unpadder()
    try:
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError as exc:
        raise Undecryptable("bad padding: wrong key or corrupt message") from exc


def _b64decode(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise Undecryptable("encrypted field is not base64") from exc


# ---- Feishu / Lark ------------------------------------------------------------------------------------------


def feishu_signature(timestamp: str, nonce: str, encrypt_key: str, body: bytes) -> str:
    """hex(sha256(timestamp + nonce + encrypt_key + raw body)), the value Feishu sends as X-Lark-Signature."""
    return hashlib.sha256((timestamp + nonce + encrypt_key).encode() + body).hexdigest()


def check_feishu_signature(timestamp: str, nonce: str, encrypt_key: str, body: bytes, signature: str) -> None:
    expected = feishu_signature(timestamp, nonce, encrypt_key, body)
    if not hmac.compare_digest(expected.encode(), signature.encode()):
        raise BadSignature("X-Lark-Signature does not match")


def _feishu_key(encrypt_key: str) -> bytes:
    # Feishu: the AES-256 key is sha256 of the encrypt key as configured in the console.
    return hashlib.sha256(encrypt_key.encode()).digest()


def feishu_decrypt(encrypt_key: str, encrypted: str) -> bytes:
    """Decrypt an `{"encrypt": ...}` body: IV is the first 16 bytes of the decoded data, AES-256-CBC, PKCS#7."""
    data = _b64decode(encrypted)
    if len(data) < 32:
        raise Undecryptable("encrypted field too short")
    return _cbc_decrypt(_feishu_key(encrypt_key), data[:16], data[16:], 128)


def feishu_encrypt(encrypt_key: str, plaintext: bytes, iv: bytes) -> str:
    """The inverse of `feishu_decrypt`, for fake platforms; `iv` is 16 random bytes supplied by the caller."""
    return base64.b64encode(iv + _cbc_encrypt(_feishu_key(encrypt_key), iv, plaintext, 128)).decode()


# ---- DingTalk -----------------------------------------------------------------------------------------------


def dingtalk_signature(token: str, timestamp: str, nonce: str, encrypt: str) -> str:
    """sha1 over the sorted [token, timestamp, nonce, encrypt] joined with nothing (DingTalk-Callback-Crypto)."""
    return hashlib.sha1("".join(sorted([token, timestamp, nonce, encrypt])).encode()).hexdigest()


def check_dingtalk_signature(token: str, timestamp: str, nonce: str, encrypt: str, signature: str) -> None:
    expected = dingtalk_signature(token, timestamp, nonce, encrypt)
    if not hmac.compare_digest(expected.encode(), signature.encode()):
        raise BadSignature("msg_signature does not match")


class DingTalkCipher:
    """AES-CBC with the EncodingAESKey: 43 base64 chars + "=" give 32 key bytes, and the IV is key[:16].

    Plaintext layout: 16 random bytes + message length (4 bytes, big-endian) + message + owner key
    (appKey, corpId or suiteKey), PKCS#7-padded to 32-byte blocks.
    """

    __slots__ = ("_key",)

    def __init__(self, encoding_aes_key: str) -> None:
        if len(encoding_aes_key) != 43:
            raise ValueError("DingTalk EncodingAESKey must be 43 characters")
        try:
            self._key = base64.b64decode(encoding_aes_key + "=", validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError("DingTalk EncodingAESKey is not base64") from exc

    def __repr__(self) -> str:
        return "DingTalkCipher(***)"

    def encrypt(self, message: bytes, owner: str, random16: bytes) -> str:
        if len(random16) != 16:
            raise ValueError("random prefix must be 16 bytes")
        plain = random16 + struct.pack(">I", len(message)) + message + owner.encode()
        return base64.b64encode(_cbc_encrypt(self._key, self._key[:16], plain, 256)).decode()

    def decrypt(self, encrypted: str) -> tuple[bytes, str]:
        """Return (message, owner key). The caller checks the owner against its app key."""
        plain = _cbc_decrypt(self._key, self._key[:16], _b64decode(encrypted), 256)
        if len(plain) < 20:
            raise Undecryptable("plaintext too short")
        (length,) = struct.unpack(">I", plain[16:20])
        if 20 + length > len(plain):
            raise Undecryptable("plaintext length field out of range")
        try:
            owner = plain[20 + length:].decode()
        except UnicodeDecodeError as exc:
            raise Undecryptable("owner key is not text") from exc
        return plain[20:20 + length], owner
