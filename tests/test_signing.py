"""Signed tasks: the pure Ed25519 verifier, keys, and a live agent that demands signatures."""

from __future__ import annotations

import base64
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgerun import ed25519
from edgerun.errors import ConfigError
from edgerun.protocol import format_time, signing_bytes
from edgerun.signing import Signer, Verifier, generate_keypair, load_public_key

from .brokers import Mosquitto
from .mqttkit import AgentProcess, Observer, shell

# RFC 8032, section 7.1: (secret key, public key, message, signature)
RFC_VECTORS = [
    ("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
     "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a", "",
     "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"),
    ("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
     "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c", "72",
     "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"),
    ("c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
     "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025", "af82",
     "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a"),
]


@pytest.mark.parametrize("secret, public, message, signature", RFC_VECTORS)
def test_rfc8032_vectors(secret: str, public: str, message: str, signature: str) -> None:
    pub, msg, sig = bytes.fromhex(public), bytes.fromhex(message), bytes.fromhex(signature)
    assert ed25519.verify(pub, msg, sig)
    assert not ed25519.verify(pub, msg + b"x", sig)
    assert not ed25519.verify(pub, msg, sig[:63] + bytes([sig[63] ^ 1]))


def test_agrees_with_cryptography_on_random_keys_and_messages() -> None:
    for size in (0, 1, 100, 5000):
        key = Ed25519PrivateKey.generate()
        pub = key.public_key().public_bytes(serialization.Encoding.Raw,
                                            serialization.PublicFormat.Raw)
        message = os.urandom(size)
        sig = key.sign(message)
        assert ed25519.verify(pub, message, sig)
        other = Ed25519PrivateKey.generate().public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        assert not ed25519.verify(other, message, sig)


def test_malleable_and_malformed_signatures_are_refused() -> None:
    _secret, public, message, signature = RFC_VECTORS[1]
    pub, msg, sig = bytes.fromhex(public), bytes.fromhex(message), bytes.fromhex(signature)
    s = int.from_bytes(sig[32:], "little") + ed25519._L  # same point, non-canonical S
    assert not ed25519.verify(pub, msg, sig[:32] + s.to_bytes(32, "little"))
    assert not ed25519.verify(pub, msg, b"\xff" * 32 + sig[32:])  # y >= p
    assert not ed25519.verify(pub, msg, sig[:40])
    assert not ed25519.verify(pub[:31], msg, sig)
    assert not ed25519.verify(b"\xff" * 32, msg, sig)


def test_keys_signer_and_verifier(tmp_path: Path) -> None:
    pem, public_b64 = generate_keypair()
    signer = Signer(pem)
    verifier = Verifier(load_public_key(public_b64))
    task = shell("signed", "echo hi")
    signed = signer.sign(task)
    assert verifier.check(signed) is None
    assert signing_bytes(signed) == signing_bytes(task)
    assert "not signed" in (verifier.check(task) or "")
    assert "does not match" in (verifier.check({**signed, "command": "rm -rf /"}) or "")
    assert "base64" in (verifier.check({**signed, "sig": "!!!"}) or "")
    assert verifier.check({**signed, "sig": 5}) is not None
    # the public key as a file, as PEM, and the errors
    pub_file = tmp_path / "task.pub"
    pub_file.write_text(public_b64 + "\n")
    assert load_public_key(str(pub_file)) == load_public_key(public_b64)
    pem_pub = Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    assert len(load_public_key(pem_pub)) == 32
    for bad in ("not-base64!", base64.b64encode(b"short").decode(), str(tmp_path / "none")):
        with pytest.raises(ConfigError):
            load_public_key(bad)
    with pytest.raises(ConfigError):
        Signer(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")


@pytest.fixture
def signed_agent(mosquitto: Mosquitto, observer: Observer, tmp_path: Path):
    pem, public_b64 = generate_keypair()
    (tmp_path / "task.pub").write_text(public_b64)
    agent = AgentProcess(mosquitto.url, "node-s", tmp_path / "a", "--public-key",
                         str(tmp_path / "task.pub")).start()
    agent.wait_online(observer)
    yield Signer(pem)
    agent.kill()


def test_agent_runs_only_validly_signed_tasks(signed_agent: Signer, observer: Observer,
                                              tmp_path: Path) -> None:
    signer = signed_agent
    marker = tmp_path / "ran"
    forger = Signer(generate_keypair()[0])
    soon = format_time(datetime.now(UTC) + timedelta(minutes=5))
    past = format_time(datetime.now(UTC) - timedelta(minutes=5))
    cases: dict[str, dict[str, Any]] = {
        "unsigned": shell("unsigned", f"echo unsigned >> {marker}"),
        "forged": forger.sign(shell("forged", f"echo forged >> {marker}")),
        "altered": {**signer.sign(shell("altered", "echo fine")),
                    "command": f"echo altered >> {marker}"},
        "replayed": signer.sign(shell("replayed", f"echo replayed >> {marker}",
                                      expires_at=past)),
    }
    for message in cases.values():
        observer.send("node-s", message)
    observer.send("node-s", signer.sign(shell("good", f"echo good >> {marker}",
                                              expires_at=soon)))
    assert observer.final("good")["state"] == "succeeded"
    for task_id in ("unsigned", "forged", "altered"):
        final = observer.final(task_id)
        assert (final["state"], final["error"]["code"]) == ("rejected", "bad_signature")
    replayed = observer.final("replayed")
    assert (replayed["state"], replayed["error"]["code"]) == ("rejected", "expired")
    assert marker.read_text() == "good\n"


def test_forged_message_cannot_use_up_a_task_id(signed_agent: Signer,
                                                observer: Observer) -> None:
    forger = Signer(generate_keypair()[0])
    observer.send("node-s", forger.sign(shell("contested", "echo forged")))
    assert observer.final("contested")["error"]["code"] == "bad_signature"
    observer.send("node-s", signed_agent.sign(shell("contested", "echo genuine")))
    observer.wait("update", id="contested", state="succeeded")
    assert observer.final("contested")["stdout"] == "genuine\n"


def test_cancel_must_be_signed_too(signed_agent: Signer, observer: Observer) -> None:
    observer.send("node-s", signed_agent.sign(shell("victim", "sleep 30")))
    observer.wait("update", id="victim", state="running")
    observer.send("node-s", {"v": 1, "kind": "cancel", "id": "victim"})
    rejected = observer.wait("update", id="victim", state="rejected")[-1]
    assert rejected["error"]["code"] == "bad_signature"
    observer.send("node-s", signed_agent.sign({"v": 1, "kind": "cancel", "id": "victim"}))
    canceled = observer.wait("update", id="victim", state="canceled")[-1]
    assert canceled["error"]["code"] == "canceled"
