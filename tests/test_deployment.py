"""The apps on Flower's deployment engine: a SuperLink and SuperNodes as separate processes on
loopback, TLS on every connection, SuperNodes authenticated by key (bounded, stops everything)."""

import json
from pathlib import Path

from simulations.deployment import LoopbackFederation, make_ca, make_certificates, make_server_certificate

from .conftest import write_items

REPO = Path(__file__).resolve().parents[1]


def _run_file(tmp_path, model, eval_file):
    path = tmp_path / "run.toml"
    path.write_text(f"""
[run]
out = "{tmp_path / 'run'}"
model = "{model}"
task = "{eval_file}"
eval_task = "{eval_file}"
num_rounds = 1
num_clients = 2
clients_per_round = 2
eval_batch_size = 8
final_table = false

[finetune]
mode = "lora"
steps = 2
batch_size = 4
lr = 5e-3

[emulator]
method = "uniform-drop"
num_adapter_layers = 2
alpha = 0.5
""")
    return path


def test_loopback_tls_federation_runs_a_round_and_turns_intruders_away(tmp_path, tiny_model_dir):
    (tmp_path / "model").symlink_to(tiny_model_dir)
    for i, name in enumerate(("org-a", "org-b", "eval")):  # every organisation has its own file
        write_items(tmp_path / f"{name}.jsonl", 30, i)
    run_file = _run_file(tmp_path, tmp_path / "model", tmp_path / "eval.jsonl")
    certs = make_certificates(tmp_path / "certs", ["127.0.0.1", "localhost"], ["org-a", "org-b", "intruder"])
    make_ca(tmp_path / "other-ca", name="someone else's CA")
    keys = certs / "keys"

    with LoopbackFederation(tmp_path / "fed", certs) as fed:
        fed.start_superlink()
        fed.register(keys / "org-a.pub", "org-a")
        fed.register(keys / "org-b.pub", "org-b")
        fed.start_supernode("org-a", keys / "org-a", tmp_path / "org-a.jsonl")
        fed.start_supernode("org-b", keys / "org-b", tmp_path / "org-b.jsonl")
        intruder = fed.start_supernode("intruder", keys / "intruder", tmp_path / "org-a.jsonl", retries=0)
        wrong_ca = fed.start_supernode("wrong-ca", keys / "org-b", tmp_path / "org-b.jsonl",
                                       root_certificates=tmp_path / "other-ca" / "ca.crt", retries=0)
        fed.wait_online(2)
        result = fed.run(REPO, {"config-file": str(run_file)}, timeout=400)
        assert result["status"] == "finished:completed", result

        # the unknown SuperNode and the one that does not trust the server's certificate are refused
        # where it is detected, and the federation served the others all along
        assert intruder.wait(timeout=60) != 0 and wrong_ca.wait(timeout=60) != 0
        assert "Failed to activate SuperNode" in (fed.logs / "supernode-intruder.log").read_text()
        assert "CERTIFICATE_VERIFY_FAILED" in (fed.logs / "supernode-wrong-ca.log").read_text()
    assert fed.processes() == []  # nothing left running

    rounds = json.loads((tmp_path / "run" / "metrics.json").read_text())["rounds"]
    assert rounds[0]["successful"] == 2 and rounds[0]["emulator_bytes_down"] > 0
    assert "plug_in_acc" in rounds[0]
    # each organisation received the emulator into its own cache, checked against its sha256
    for org in ("org-a", "org-b"):
        assert any((tmp_path / "fed" / "owners" / org).glob("*/model.safetensors"))


def test_a_supernode_refuses_an_expired_server_certificate(tmp_path):
    ca = make_ca(tmp_path)
    make_server_certificate(tmp_path, ca, ["127.0.0.1"], expired=True, name="expired")
    from simulations.deployment import make_supernode_key

    key = make_supernode_key(tmp_path / "keys" / "org")
    (tmp_path / "data.jsonl").write_text("")
    with LoopbackFederation(tmp_path / "fed", tmp_path, server_cert="expired") as fed:
        fed.start_superlink()
        node = fed.start_supernode("org", key, tmp_path / "data.jsonl", retries=0)
        assert node.wait(timeout=60) != 0
        assert "certificate has expired" in (fed.logs / "supernode-org.log").read_text()
    assert fed.processes() == []


def test_certs_command_writes_a_ca_server_certificate_and_keys_and_never_overwrites(tmp_path, capsys):
    from cryptography import x509

    from scaleot_fed_cli.main import main

    out = tmp_path / "certs"
    assert main(["certs", "--out", str(out), "--host", "fl.example.org", "--host", "10.0.0.5",
                 "--supernode", "hospital-a"]) == 0
    cert = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "fl.example.org" in names.get_values_for_type(x509.DNSName)
    assert (out / "keys" / "hospital-a.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    assert oct((out / "keys" / "hospital-a").stat().st_mode)[-3:] == "600"
    assert main(["certs", "--out", str(out)]) == 2 and "already holds a CA" in capsys.readouterr().err
