"""mTLS on a real gRPC server on loopback, device identity, and Ed25519 adapter signatures."""

from __future__ import annotations

import json
from concurrent import futures

import grpc
import numpy as np
import pytest
import torch
from cryptography import x509
from safetensors.torch import save_file

from fedge.protocol.signing import (
    SIGNATURE_FILE,
    AdapterSignatureError,
    generate_signing_key,
    load_public_key,
    load_signing_key,
    load_verified_adapter,
    sign_adapter_dir,
    sign_blobs,
    verify_blobs,
)
from fedge.protocol.tls import (
    CertificateError,
    CertPaths,
    channel_credentials,
    create_certificates,
    device_channel_credentials,
    require_device,
    server_credentials,
)

METHOD = "/fedge.test.Identity/WhoAmI"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    good = create_certificates(tmp_path_factory.mktemp("certs"), devices=["phone-1", "laptop-2", "revoked-3"])
    other = create_certificates(tmp_path_factory.mktemp("other-ca"), devices=["phone-1"])
    return good, other


@pytest.fixture(scope="module")
def mtls_server(certs):
    good, _ = certs

    def who_am_i(request: bytes, context) -> bytes:
        return require_device(context, allowed={"phone-1", "laptop-2"}).encode()

    handler = grpc.method_handlers_generic_handler(
        "fedge.test.Identity", {"WhoAmI": grpc.unary_unary_rpc_method_handler(who_am_i)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_secure_port("127.0.0.1:0", server_credentials(good.root, require_client_auth=True))
    server.start()
    yield port
    server.stop(grace=None)


def _call(port: int, credentials, host: str = "localhost") -> bytes:
    with grpc.secure_channel(f"{host}:{port}", credentials) as channel:
        return channel.unary_unary(METHOD)(b"", timeout=10)


def test_certificate_layout_and_identity(certs):
    good, _ = certs
    cert = x509.load_pem_x509_certificate(good.device_cert("phone-1").read_bytes())
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "phone-1"
    server = x509.load_pem_x509_certificate(good.server_cert.read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert (good.device_key("phone-1").stat().st_mode & 0o777) == 0o600
    assert good.signing_key.is_file() and good.signing_public_key.is_file()


def test_mtls_identifies_the_device(certs, mtls_server):
    good, _ = certs
    assert _call(mtls_server, device_channel_credentials(good.root, "phone-1")) == b"phone-1"
    assert _call(mtls_server, device_channel_credentials(good.root, "laptop-2"), host="127.0.0.1") == b"laptop-2"


def test_client_trusting_the_wrong_ca_is_refused(certs, mtls_server):
    good, other = certs
    # right client certificate, but it does not trust the server's CA: the handshake fails
    creds = channel_credentials(other.ca_cert, good.device_cert("phone-1"), good.device_key("phone-1"))
    with pytest.raises(grpc.RpcError) as info:
        _call(mtls_server, creds)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_client_without_or_with_foreign_certificate_is_refused(certs, mtls_server):
    good, other = certs
    with pytest.raises(grpc.RpcError) as info:
        _call(mtls_server, channel_credentials(good.ca_cert))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    # a device certificate from another CA, even with the same device id
    with pytest.raises(grpc.RpcError) as info:
        _call(mtls_server, channel_credentials(good.ca_cert, other.device_cert("phone-1"), other.device_key("phone-1")))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    # plaintext against a TLS port
    with grpc.insecure_channel(f"127.0.0.1:{mtls_server}") as channel, pytest.raises(grpc.RpcError):
        channel.unary_unary(METHOD)(b"", timeout=10)


def test_revoked_device_is_denied(certs, mtls_server):
    good, _ = certs
    with pytest.raises(grpc.RpcError) as info:
        _call(mtls_server, device_channel_credentials(good.root, "revoked-3"))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_certificate_input_errors(tmp_path, certs):
    with pytest.raises(CertificateError, match="device id"):
        create_certificates(tmp_path / "x", devices=["bad id/with slash"])
    with pytest.raises(CertificateError, match="not found"):
        server_credentials(tmp_path / "nowhere")
    # extending an existing directory keeps the CA and adds the device
    good, _ = certs
    ca_before = good.ca_cert.read_bytes()
    create_certificates(good.root, devices=["tablet-4"])
    assert good.ca_cert.read_bytes() == ca_before and CertPaths(good.root).device_cert("tablet-4").is_file()


def _adapter_dir(path, seed: int = 0):
    path.mkdir()
    generator = torch.Generator().manual_seed(seed)
    save_file({"base_model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 64, generator=generator),
               "base_model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 4)},
              str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    return path


def test_signed_adapter_round_trip(tmp_path, certs):
    good, _ = certs
    key = load_signing_key(good.signing_key)
    adapter = _adapter_dir(tmp_path / "adapter")
    sign_adapter_dir(adapter, key, metadata={"version": 3, "base_model": "tiny-random-llama"})
    state, config, metadata = load_verified_adapter(adapter, load_public_key(good.signing_public_key))
    assert metadata == {"version": 3, "base_model": "tiny-random-llama"}
    assert config["r"] == 4 and state["base_model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 64)


def test_unsigned_tampered_or_foreign_adapters_are_refused(tmp_path, certs):
    good, other = certs
    trusted = load_public_key(good.signing_public_key)
    key = load_signing_key(good.signing_key)

    unsigned = _adapter_dir(tmp_path / "unsigned")
    with pytest.raises(AdapterSignatureError, match="unsigned"):
        load_verified_adapter(unsigned, trusted)

    tampered = _adapter_dir(tmp_path / "tampered")
    sign_adapter_dir(tampered, key, metadata={"version": 1})
    weights = bytearray((tampered / "adapter_model.safetensors").read_bytes())
    weights[-1] ^= 0x01  # one bit of one weight
    (tampered / "adapter_model.safetensors").write_bytes(bytes(weights))
    with pytest.raises(AdapterSignatureError, match="modified after signing"):
        load_verified_adapter(tampered, trusted)

    relabelled = _adapter_dir(tmp_path / "relabelled")
    sign_adapter_dir(relabelled, key, metadata={"version": 1})
    sig = json.loads((relabelled / SIGNATURE_FILE).read_text())
    sig["metadata"]["version"] = 2  # claim a newer version with the old signature
    (relabelled / SIGNATURE_FILE).write_text(json.dumps(sig))
    with pytest.raises(AdapterSignatureError, match="invalid"):
        load_verified_adapter(relabelled, trusted)

    foreign = _adapter_dir(tmp_path / "foreign")
    sign_adapter_dir(foreign, load_signing_key(other.signing_key), metadata={"version": 1})
    with pytest.raises(AdapterSignatureError, match="invalid"):
        load_verified_adapter(foreign, trusted)


def test_blob_signatures_cover_every_byte():
    key = generate_signing_key()
    blobs = {"adapter_model.safetensors": np.arange(100, dtype=np.uint8).tobytes(), "adapter_config.json": b"{}"}
    signature = sign_blobs(blobs, {"round": 5}, key)
    assert verify_blobs(blobs, signature, key.public_key()) == {"round": 5}
    with pytest.raises(AdapterSignatureError, match="differ"):
        verify_blobs({"adapter_model.safetensors": blobs["adapter_model.safetensors"]}, signature, key.public_key())
    with pytest.raises(AdapterSignatureError, match="unsigned"):
        verify_blobs(blobs, None, key.public_key())
    with pytest.raises(ValueError, match="plain JSON"):
        sign_blobs(blobs, {"bad": object()}, key)


def test_edge_cloud_link_over_mutual_tls(certs):
    """The serving path's own stubs and the edge's CloudLink, over mTLS: the servicer sees the device id."""
    from fedge.edge.client import CloudLink
    from fedge.protocol import fedge_pb2, fedge_pb2_grpc

    good, other = certs

    class Verifier(fedge_pb2_grpc.VerifierServicer):
        def Health(self, request, context):
            return fedge_pb2.HealthReply(status=f"SERVING for {require_device(context)}")

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    fedge_pb2_grpc.add_VerifierServicer_to_server(Verifier(), server)
    port = server.add_secure_port("127.0.0.1:0", server_credentials(good.root))
    server.start()
    try:
        link = CloudLink(f"127.0.0.1:{port}", None, 10.0, device_channel_credentials(good.root, "laptop-2"))
        assert link.call("Health", fedge_pb2.HealthRequest()).status == "SERVING for laptop-2"
        link.close()
        stranger = CloudLink(f"127.0.0.1:{port}", None, 10.0, device_channel_credentials(other.root, "phone-1"))
        with pytest.raises(grpc.RpcError):
            stranger.call("Health", fedge_pb2.HealthRequest())
        stranger.close()
        plain = CloudLink(f"127.0.0.1:{port}", None, 10.0)
        with pytest.raises(grpc.RpcError):
            plain.call("Health", fedge_pb2.HealthRequest())
        plain.close()
    finally:
        server.stop(grace=None)


def test_signed_files_are_read_only_as_plain_files_inside_the_dir(tmp_path):
    key = generate_signing_key()
    adapter = _adapter_dir(tmp_path / "adapter")
    sign_adapter_dir(adapter, key, metadata={"version": "adapter"})
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.safetensors").symlink_to(outside)  # identical bytes, but through a link
    with pytest.raises(AdapterSignatureError, match="symlink"):
        load_verified_adapter(adapter, key.public_key())
    linked_dir = tmp_path / "linked"
    linked_dir.symlink_to(_adapter_dir(tmp_path / "real"), target_is_directory=True)
    sign_adapter_dir(tmp_path / "real", key, metadata={"version": "real"})
    with pytest.raises(AdapterSignatureError, match="symlink"):
        load_verified_adapter(linked_dir, key.public_key())


def test_signed_metadata_binds_the_version_name():
    from fedge.protocol.signing import AdapterMetadata, check_plain_name

    signed = {"version": "v000002", "sequence": 2, "base_model": "tiny-random-llama", "base_model_fingerprint": "ab"}
    assert AdapterMetadata.from_signed(signed, "v000002").sequence == 2
    with pytest.raises(AdapterSignatureError, match="relabelled"):
        AdapterMetadata.from_signed(signed, "v000009")
    for bad in ({**signed, "sequence": "2"}, {**signed, "sequence": True}, {**signed, "sequence": 0},
                {**signed, "base_model_fingerprint": ""}):
        with pytest.raises(AdapterSignatureError):
            AdapterMetadata.from_signed(bad, "v000002")
    for name in ("../x", "/etc/passwd", "a/b", "..", ".hidden", "", "x" * 200, "v..1"):
        with pytest.raises(AdapterSignatureError, match="plain name"):
            check_plain_name(name, "file name")
