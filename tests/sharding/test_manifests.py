"""The Kubernetes manifests agree with each other, with serve.py's flags and with the slices they ask for."""

import math
import re

import pytest
import yaml

from multidevice import ROOT
from mmserve.cluster_credential import SECRET_ENV
from mmserve.distributed import MeshShape
from mmserve.distributed.multihost import ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID
from transfer.config import ENV as TRANSFER_ENV

K8S = ROOT / "deploy" / "k8s"
ROLES = ("encode", "prefill", "decode")
WORKER_INDEX = "leaderworkerset.sigs.k8s.io/worker-index"


def _documents(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _by_kind(path):
    return {d["kind"]: d for d in _documents(path)}


def _flags(args: list[str]) -> dict[str, str]:
    assert len(args) % 2 == 0 and all(a.startswith("--") for a in args[::2]), args
    return dict(zip(args[::2], args[1::2]))


def _ports(container) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container["ports"]}


def _documented_flags() -> set[str]:
    text = (ROOT / "docs" / "deploy.md").read_text()
    table = text.split("## The flags the manifests use")[1].split("\n\n")[2]
    return set(re.findall(r"^\| `(--[a-z-]+)`", table, re.M))


@pytest.fixture(scope="module")
def router():
    docs = _by_kind(K8S / "router.yaml")
    return docs["Deployment"], docs["Service"]


def _role(role):
    docs = _by_kind(K8S / f"{role}.yaml")
    lws, service = docs["LeaderWorkerSet"], docs["Service"]
    pod = lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]
    return lws, service, pod, pod["spec"]["containers"][0]


def test_kustomization_lists_every_manifest():
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def test_router_service_selects_router_pods(router):
    deployment, service = router
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    flags = _flags(container["args"])
    assert flags["--role"] == "router"
    assert flags["--host"] == "0.0.0.0", "the Service reaches the pod on its IP, not on loopback"
    assert {"name": TRANSFER_ENV["bind_host"], "value": "0.0.0.0"} in container["env"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["port"] == _ports(container)["http"] == int(flags["--port"])


@pytest.mark.parametrize("role", ROLES)
def test_role_flags_ports_and_router_url_agree(role, router):
    lws, service, pod, container = _role(role)
    flags = _flags(container["args"])
    assert set(flags) <= _documented_flags()
    assert lws["metadata"]["name"] == service["metadata"]["name"] == f"mmserve-{role}"
    assert flags["--role"] == role
    ports = _ports(container)
    assert ports["grpc"] == int(flags["--port"])
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"grpc": ports["grpc"]}
    router_flags = _flags(router[0]["spec"]["template"]["spec"]["containers"][0]["args"])
    router_service = router[1]
    router_ports = {p["name"]: p["port"] for p in router_service["spec"]["ports"]}
    name = router_service["metadata"]["name"]
    assert router_ports["registry"] == int(router_flags["--registry-port"])
    assert router_ports["bootstrap"] == int(router_flags["--bootstrap-port"])
    assert flags["--router-url"] == f"{name}:{router_ports['registry']}"
    assert flags["--bootstrap"] == f"tcp://{name}:{router_ports['bootstrap']}"
    assert flags["--model"] == _flags(router[0]["spec"]["template"]["spec"]["containers"][0]["args"])["--model"]


@pytest.mark.parametrize("role", ROLES)
def test_role_service_selects_only_the_leader(role):
    _, service, pod, _ = _role(role)
    selector = dict(service["spec"]["selector"])
    assert selector.pop(WORKER_INDEX) == "0"
    assert selector.items() <= pod["metadata"]["labels"].items()


@pytest.mark.parametrize("role", ROLES)
def test_mesh_hosts_and_chips_match_the_slice(role):
    lws, _, pod, container = _role(role)
    hosts = lws["spec"]["leaderWorkerTemplate"]["size"]
    chips = int(container["resources"]["limits"]["google.com/tpu"])
    assert container["resources"]["requests"]["google.com/tpu"] == container["resources"]["limits"]["google.com/tpu"]
    topology = pod["spec"]["nodeSelector"]["cloud.google.com/gke-tpu-topology"]
    assert math.prod(int(n) for n in topology.split("x")) == hosts * chips
    assert MeshShape.parse(_flags(container["args"])["--mesh"]).num_devices == hosts * chips


@pytest.mark.parametrize("role", ROLES)
def test_cluster_env_points_at_the_group_leader(role):
    lws, _, _, container = _role(role)
    env = {e["name"]: e for e in container["env"]}
    assert {ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID} <= set(env)
    assert env[ENV_COORDINATOR]["value"] == f"$(LWS_LEADER_ADDRESS):{_ports(container)['coordinator']}"
    assert env[ENV_NUM_PROCESSES]["value"] == str(lws["spec"]["leaderWorkerTemplate"]["size"])
    assert env[ENV_PROCESS_ID]["valueFrom"]["fieldRef"]["fieldPath"] == f"metadata.labels['{WORKER_INDEX}']"


def test_v6e_overlay_replaces_the_accelerator_of_every_role():
    overlay = yaml.safe_load((K8S / "v6e" / "kustomization.yaml").read_text())
    (patch,) = overlay["patches"]
    assert patch["target"]["kind"] == "LeaderWorkerSet"
    (op,) = yaml.safe_load(patch["patch"])
    key = op["path"].rsplit("/", 1)[1].replace("~1", "/")
    assert op["value"] == "tpu-v6e-slice"
    for role in ROLES:
        assert key in _role(role)[2]["spec"]["nodeSelector"]


def test_dockerfile_exposes_every_container_port(router):
    exposed = {int(p) for line in (ROOT / "deploy" / "Dockerfile").read_text().splitlines()
               if line.startswith("EXPOSE") for p in line.split()[1:]}
    ports = set(_ports(router[0]["spec"]["template"]["spec"]["containers"][0]).values())
    for role in ROLES:
        ports |= set(_ports(_role(role)[3]).values())
    assert ports <= exposed


@pytest.mark.parametrize("role", ROLES)
def test_role_listens_everywhere_and_advertises_its_pod_ip(role):
    """The router dials the registered gRPC address and peers dial the published transfer
    endpoints: both must be the pod's IP, while the sockets bind every interface."""
    _, _, _, container = _role(role)
    env = {e["name"]: e for e in container["env"]}
    assert _flags(container["args"])["--host"] == "0.0.0.0"
    assert env[TRANSFER_ENV["bind_host"]]["value"] == "0.0.0.0"
    assert env[TRANSFER_ENV["advertise_host"]]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"


@pytest.mark.parametrize("role", ["router", "encode", "prefill", "decode"])
def test_every_process_gets_the_cluster_secret_from_the_same_kubernetes_secret(role, router):
    """Not from its arguments: argv is readable by every user of the node."""
    container = router[0]["spec"]["template"]["spec"]["containers"][0] if role == "router" else _role(role)[3]
    env = {e["name"]: e for e in container["env"]}
    assert env[SECRET_ENV]["valueFrom"] == {"secretKeyRef": {"name": "mmserve-cluster", "key": "secret"}}
    assert not any("secret" in arg for arg in container["args"])


@pytest.mark.parametrize("role", ["router", "encode", "prefill", "decode"])
def test_no_container_can_gain_privileges(role, router):
    container = router[0]["spec"]["template"]["spec"]["containers"][0] if role == "router" else _role(role)[3]
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def test_the_router_runs_as_the_images_own_user_and_asks_for_an_api_key_from_a_secret(router):
    pod = router[0]["spec"]["template"]["spec"]
    uid = int(re.search(r"useradd .*--uid (\d+)", (ROOT / "deploy" / "Dockerfile").read_text()).group(1))
    assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": uid}
    container = pod["containers"][0]
    key_file = _flags(container["args"])["--api-key-file"]
    mount = next(m for m in container["volumeMounts"] if key_file.startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] and mount["readOnly"]


def test_only_the_deployments_pods_reach_its_ports_but_the_routers_http_one():
    policies = {d["metadata"]["name"]: d["spec"] for d in _documents(K8S / "networkpolicy.yaml")}
    internal, http = policies["mmserve-internal"], policies["mmserve-router-http"]
    assert internal["podSelector"]["matchLabels"] == {"app": "mmserve"} and internal["policyTypes"] == ["Ingress"]
    assert internal["ingress"] == [{"from": [{"podSelector": {"matchLabels": {"app": "mmserve"}}}]}]
    assert http["podSelector"]["matchLabels"] == {"app": "mmserve", "role": "router"}
    deployment = _by_kind(K8S / "router.yaml")["Deployment"]
    http_port = _ports(deployment["spec"]["template"]["spec"]["containers"][0])["http"]
    assert http["ingress"] == [{"ports": [{"port": http_port, "protocol": "TCP"}]}]
    assert deployment["spec"]["template"]["metadata"]["labels"].items() >= http["podSelector"]["matchLabels"].items()
    for role in ROLES:
        assert _role(role)[2]["metadata"]["labels"].items() >= internal["podSelector"]["matchLabels"].items()


def test_every_role_serves_the_checkpoints_dtype_with_the_planned_kv_cache(router):
    """Without these flags the manifests ran the 30B model in float32 with the default 256 MiB of
    KV for the whole mesh: about 1,300 tokens, less than one image chat."""
    import json

    text = json.loads((ROOT / "deploy" / "configs" / "qwen3-vl-30b-a3b-instruct.json").read_text())["text_config"]
    bytes_per_token = text["num_hidden_layers"] * 2 * text["num_key_value_heads"] * text["head_dim"] * 2  # K, V; bf16
    context = int(_flags(router[0]["spec"]["template"]["spec"]["containers"][0]["args"])["--max-model-len"])
    for role in ROLES:
        flags = _flags(_role(role)[3]["args"])
        assert flags["--dtype"] == "bfloat16", role
        if role != "encode":
            assert int(flags["--max-model-len"]) == context
            assert int(flags["--kv-cache-bytes"]) // bytes_per_token == 131072 >= context, role
