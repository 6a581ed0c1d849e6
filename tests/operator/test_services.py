"""The Services the operator owns: an Inference workload's (leaders only when replicas span nodes,
ports from the template), a headless one per spanning replica, and the changes against what
exists."""

from __future__ import annotations

from typing import Any

from wattsched_api.vocabulary import SERVICE_ROLE_LABEL
from wattsched_operator import services
from wattsched_operator.statuses import PodView, served_replicas
from wattsched_optimizer.problem import Placement


def body(name: str, *, type_: str = "Inference", nodes: int = 1, ports: Any = None) -> Any:
    container: dict[str, Any] = {"name": "server", "image": "vllm"}
    if ports is not None:
        container["ports"] = ports
    return {
        "metadata": {"name": name, "namespace": "team-a", "uid": f"uid-{name}"},
        "spec": {
            "type": type_,
            "gpu": {"count": 8, "nodesPerReplica": nodes},
            "template": {"spec": {"containers": [container]}},
        },
    }


def placement(workload: str, replica: int, rank: int = 0, nodes: int = 1) -> Placement:
    return Placement(
        workload=f"team-a/{workload}",
        replica=replica,
        node=f"n{replica}-{rank}",
        gpus=8,
        variant="bf16",
        power_limit_watts=500,
        expected_watts_per_gpu=400,
        expected_throughput=10,
        rank=rank,
        nodes_per_replica=nodes,
    )


def pod(name: str, *, ready: bool, rank: int | None = None, deleting: bool = False) -> Any:
    workload = name.rsplit("-", 1)[0] if rank is None else name.rsplit("-", 2)[0]
    labels = {"wattsched.io/workload": workload}
    if rank is not None:
        labels["wattsched.io/rank"] = str(rank)
    meta: dict[str, Any] = {"name": name, "namespace": "team-a", "labels": labels}
    if deleting:
        meta["deletionTimestamp"] = "2026-12-07T23:00:00Z"
    status = "True" if ready else "False"
    return {"metadata": meta, "status": {"conditions": [{"type": "Ready", "status": status}]}}


def test_an_inference_service_selects_its_pods_with_the_template_ports() -> None:
    chat = body("chat", ports=[{"name": "http", "containerPort": 8000}])
    want = services.desired_from_plan({"team-a/chat": chat}, [placement("chat", 0)], ())
    service = want[("team-a", "chat")]
    assert service["spec"]["selector"] == {"wattsched.io/workload": "chat"}
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}
    ]
    assert "clusterIP" not in service["spec"]
    assert service["metadata"]["ownerReferences"][0]["uid"] == "uid-chat"
    assert services.status_service(chat) == "chat"


def test_spanning_replicas_expose_only_leaders_and_get_a_headless_service_each() -> None:
    big = body("big", nodes=2, ports=[{"containerPort": 8000}, {"containerPort": 9000}])
    placements = [placement("big", r, k, nodes=2) for r in (0, 1) for k in (0, 1)]
    want = services.desired_from_plan({"team-a/big": big}, placements, ())
    assert set(want) == {("team-a", "big"), ("team-a", "big-0"), ("team-a", "big-1")}
    assert want[("team-a", "big")]["spec"]["selector"] == {
        "wattsched.io/workload": "big",
        "wattsched.io/rank": "0",
    }
    assert [p["name"] for p in want[("team-a", "big")]["spec"]["ports"]] == ["port-0", "port-1"]
    assert want[("team-a", "big-1")]["spec"]["clusterIP"] == "None"


def test_training_gets_no_inference_service_and_bad_names_get_none() -> None:
    job = body("train", type_="Training")
    assert services.desired_from_plan({"team-a/train": job}, [placement("train", 0)], ()) == {}
    assert services.status_service(job) is None
    dotted = body("chat.v2")
    assert services.desired_from_plan({"team-a/chat.v2": dotted}, [], ()) == {}
    assert services.status_service(dotted) is None


def test_a_template_without_ports_gets_a_headless_service() -> None:
    want = services.desired_from_plan({"team-a/chat": body("chat")}, [], ())
    assert want[("team-a", "chat")]["spec"]["clusterIP"] == "None"
    assert "ports" not in want[("team-a", "chat")]["spec"]


def test_an_inference_service_is_built_when_read_not_held_and_a_headless_one_wins_its_name() -> (
    None
):
    chat = body("chat", ports=[{"name": "http", "containerPort": 8000}])
    big = body("big", nodes=2)
    # A workload named like the headless Service of another's replica: the headless one wins.
    clash = body("big-3")
    bodies = {"team-a/chat": chat, "team-a/big": big, "team-a/big-3": clash}
    want = services.desired_from_plan(bodies, [placement("big", 3, 0, nodes=2)], ())
    assert sorted(want) == [("team-a", "big"), ("team-a", "big-3"), ("team-a", "chat")]
    assert len(want) == 3
    first, again = want[("team-a", "chat")], want[("team-a", "chat")]
    assert first == again
    assert first is not again  # built as it is read: the round holds what builds it
    assert first["spec"]["ports"][0]["port"] == 8000
    assert want[("team-a", "big-3")]["metadata"]["labels"][SERVICE_ROLE_LABEL] == ("rendezvous")


def existing(service: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {**service, "spec": {**service["spec"], "clusterIP": "10.0.0.7", **spec}}


def test_changes_create_missing_patch_drifted_and_delete_unwanted_owned_services() -> None:
    chat = body("chat", ports=[{"name": "http", "containerPort": 8000}])
    want = services.desired_from_plan({"team-a/chat": chat}, [], [pod("chat-0", ready=True)])
    changes = services.service_changes([], want)
    assert [s["metadata"]["name"] for s in changes.create] == ["chat"]
    drifted = existing(want[("team-a", "chat")], selector={"wattsched.io/workload": "other"})
    old = services.desired_from_plan(
        {"team-a/big": body("big", nodes=2)}, [placement("big", 3, 0, nodes=2)], ()
    )[("team-a", "big-3")]
    foreign = {"metadata": {"name": "mine", "namespace": "team-a"}, "spec": {}}
    changes = services.service_changes([drifted, old, foreign], want)
    assert changes.create == ()
    assert changes.patch[("team-a", "chat")]["spec"]["selector"] == {
        "wattsched.io/workload": "chat"
    }
    assert changes.delete == (("team-a", "big-3"),)


def test_a_spanning_replica_is_ready_only_when_every_pod_serves() -> None:
    placements = [placement("big", 0, k, nodes=2) for k in (0, 1)]
    leader = PodView(replica=0, node="n0-0", phase="Running", ready=True, rank=0)
    worker = PodView(replica=0, node="n0-1", phase="Running", ready=False, rank=1)
    assert served_replicas(placements, [leader, worker]) == 0
    worker = PodView(replica=0, node="n0-1", phase="Running", ready=True, rank=1)
    assert served_replicas(placements, [leader, worker]) == 1


def as_listed(service: dict[str, Any], **metadata: Any) -> dict[str, Any]:
    """A Service as the API server lists it: managed fields, defaults, status."""
    meta = {
        **service["metadata"],
        "uid": "uid-svc",
        "resourceVersion": "42",
        "managedFields": [{"manager": "wattsched", "fieldsV1": {"f:spec": {}}}],
        **metadata,
    }
    spec = {
        "clusterIPs": [service["spec"].get("clusterIP", "10.0.0.7")],
        "type": "ClusterIP",
        "sessionAffinity": "None",
        **service["spec"],
    }
    spec.setdefault("clusterIP", "10.0.0.7")
    for port in spec.get("ports") or []:
        port.setdefault("protocol", "TCP")
    return {"metadata": meta, "spec": spec, "status": {"loadBalancer": {}}}


def test_what_is_kept_of_a_listed_service_decides_the_same_changes_as_all_of_it() -> None:
    chat = body("chat", ports=[{"name": "http", "containerPort": 8000}])
    quiet = body("quiet")
    want = services.desired_from_plan(
        {"team-a/chat": chat, "team-a/quiet": quiet, "team-a/gone": body("gone")}, [], ()
    )
    listed = [
        as_listed(want[("team-a", "chat")], uid="uid-chat-svc"),  # as wanted
        as_listed(  # drifted
            {
                **want[("team-a", "quiet")],
                "spec": {**want[("team-a", "quiet")]["spec"], "selector": {"x": "y"}},
            }
        ),
        as_listed(want[("team-a", "gone")], deletionTimestamp="2026-12-06T03:00:00Z"),
        as_listed({"metadata": {"name": "mine", "namespace": "team-a"}, "spec": {}}),  # foreign
        as_listed(
            services.desired_from_plan({"team-a/old": body("old")}, [], ())[("team-a", "old")]
        ),  # owned, no longer wanted
    ]
    kept = [services.compared(s) for s in listed]
    assert services.service_changes(kept, want) == services.service_changes(listed, want)
    changes = services.service_changes(kept, want)
    assert list(changes.patch) == [("team-a", "quiet")]
    assert changes.delete == (("team-a", "old"),)
    assert all("managedFields" not in k["metadata"] and "status" not in k for k in kept)


def test_an_inference_service_is_created_once_a_pod_it_selects_is_ready_and_then_kept() -> None:
    chat = body("chat", ports=[{"name": "http", "containerPort": 8000}])
    big = body("big", nodes=2, ports=[{"containerPort": 8000}])
    bodies = {"team-a/chat": chat, "team-a/big": big}
    placements = [placement("big", 0, k, nodes=2) for k in (0, 1)]

    def created(pods: list[Any]) -> list[str]:
        want = services.desired_from_plan(bodies, placements, pods)
        return [s["metadata"]["name"] for s in services.service_changes([], want).create]

    # Nothing ready: only the spanning replica's headless Service (its pods find each other).
    assert created([pod("chat-0", ready=False), pod("big-0-0", ready=False, rank=0)]) == ["big-0"]
    # A ready worker of a spanning replica, or a ready pod being deleted, serves nothing.
    assert created(
        [pod("big-0-1", ready=True, rank=1), pod("chat-0", ready=True, deleting=True)]
    ) == ["big-0"]
    assert created([pod("chat-0", ready=True), pod("big-0-0", ready=True, rank=0)]) == [
        "big",
        "big-0",
        "chat",
    ]
    # Once it exists it stays, and is still patched, while no pod serves (a move, a restart).
    want = services.desired_from_plan(bodies, placements, [pod("chat-0", ready=True)])
    drifted = existing(want[("team-a", "chat")], selector={"wattsched.io/workload": "other"})
    changes = services.service_changes(
        [drifted], services.desired_from_plan(bodies, placements, [])
    )
    assert changes.delete == ()
    assert list(changes.patch) == [("team-a", "chat")]
    assert [s["metadata"]["name"] for s in changes.create] == ["big-0"]
