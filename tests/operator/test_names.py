"""Every name and label the operator derives from a run fits Kubernetes' rules for its kind, for every
valid run name (any DNS-1123 subdomain: dots, 253 characters, digits first), and distinct runs get
distinct names. Property tests over generated names, and the real API server validating every object
built for the edge names (tests/operator/test_reconcile.py runs such runs end to end)."""

from __future__ import annotations

import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from kubernetes import client
from rlsdrun_samples import defaulted_run

from rlsd_contracts.wire import LEARNER, ROLLOUT, TEACHER
from rlsd_operator import builders, kueue, names, placement

# Kubernetes' validation (k8s.io/apimachinery/pkg/util/validation).
DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
DNS1123_SUBDOMAIN = re.compile(rf"{DNS1123_LABEL.pattern}(\.{DNS1123_LABEL.pattern})*")
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
LONGEST_NAMESPACE = "n" * 63
LARGEST = names.MAX_INDEX

# A subdomain's parts are not limited to 63 characters (only the whole name, to 253).
label = st.from_regex(r"\A[a-z0-9]([-a-z0-9]{0,98}[a-z0-9])?\Z")
run_names = st.lists(label, min_size=1, max_size=10).map(".".join).filter(lambda name: len(name) <= 253)
EDGES = ["demo", "team.a.run-1", "1st-run", "0", "a" * 63 + "." + "b" * 63 + "." + "c" * 63 + "." + "d" * 61]


def dns_label(name: str, pattern: re.Pattern[str] = DNS1123_LABEL) -> bool:
    return len(name) <= 63 and bool(pattern.fullmatch(name))


def subdomain(name: str) -> bool:
    return len(name) <= 253 and bool(DNS1123_SUBDOMAIN.fullmatch(name))


def label_value(value: str) -> bool:
    return len(value) <= 63 and bool(LABEL_VALUE.fullmatch(value))


@given(run_names)
@settings(max_examples=300, deadline=None)
@example(EDGES[0])
@example(EDGES[1])
@example(EDGES[2])
@example(EDGES[3])
@example(EDGES[4])
def test_every_derived_name_fits_its_kind(run: str) -> None:
    assert subdomain(run)
    stem = names.stem(run)
    assert dns_label(stem, DNS1035_LABEL) and len(stem) <= names.STEM_MAX and names.stem(run) == stem
    for role in (LEARNER, ROLLOUT, TEACHER):
        assert dns_label(names.service_name(run, role), DNS1035_LABEL)  # a Service name
    for index in (0, LARGEST):
        assert dns_label(names.learner_hostname(run, index))
        assert dns_label(names.server_pod_name(run, ROLLOUT, index))  # also its hostname
        assert dns_label(names.server_pod_name(run, TEACHER, index))
        assert subdomain(names.learner_pod_name(run, 10**6, index))
    assert subdomain(names.config_map_name(run)) and subdomain(names.claim_name(run))
    assert all(label_value(value) for value in names.labels(run, LEARNER).values())
    for attempt in (1, 10**9):  # a Kueue pod group: a label value, and its Workload's name
        group = kueue.group_name(run, "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0", attempt)
        assert label_value(group) and subdomain(group) and group.endswith(f"-0f1e2d-a{attempt}")
    url = names.server_url(run, TEACHER, LARGEST, LONGEST_NAMESPACE, "cluster.local")
    assert len(url.split("//")[1].split(":")[0]) <= 253  # a DNS name


@given(st.lists(run_names, min_size=2, max_size=40, unique=True))
@settings(max_examples=100, deadline=None)
def test_distinct_runs_get_distinct_stems(runs: list[str]) -> None:
    stems = [names.stem(run) for run in runs]
    assert len(set(stems)) == len(stems)


def test_short_label_names_are_kept_and_others_get_a_readable_hashed_stem() -> None:
    assert names.stem("demo") == "demo"
    assert re.fullmatch(r"team-a-run-1-[0-9a-f]{10}", names.stem("team.a.run-1"))
    assert re.fullmatch(r"r1st-run-[0-9a-f]{10}", names.stem("1st-run"))
    assert names.stem("team-a-run-1") == "team-a-run-1" != names.stem("team.a.run-1")


@given(st.sampled_from(EDGES) | run_names)
@settings(max_examples=40, deadline=None)
def test_the_objects_built_for_any_name_carry_valid_names_labels_and_hostnames(run_name: str) -> None:
    teacher = {"placement": "remote", "replicas": 1, "image": "t", "weightTransfer": "gloo"}
    run = defaulted_run(name=run_name, spec={"teacher": teacher})
    objects = [
        builders.build_config_map(run),
        *builders.build_services(run),
        builders.build_learner_pod(run, 1, 3),
        *(builders.beside_run(p, run_name) for p in builders.build_server_pods(run)),
    ]
    for obj in objects:
        meta = obj["metadata"]
        assert subdomain(meta["name"]) and all(label_value(v) for v in meta["labels"].values())
        if obj["kind"] == "Service":
            assert dns_label(meta["name"], DNS1035_LABEL)
        if obj["kind"] == "Pod":
            assert dns_label(obj["spec"]["hostname"]) and dns_label(obj["spec"]["subdomain"], DNS1035_LABEL)
        assert meta["ownerReferences"][0]["name"] == run_name


@pytest.mark.k8s
@pytest.mark.parametrize("run_name", EDGES)
def test_the_real_api_server_accepts_every_object_built_for_any_name(
    api_client: client.ApiClient, namespace: str, run_name: str
) -> None:
    """Each object a run owns, for the edge names, passes the API server's own validation (a
    server-side dry run: names, hostnames, subdomains, labels, selectors, affinity: a learner pinned to
    a node, servers beside the run's other pods)."""
    teacher = {"placement": "remote", "replicas": 1, "image": "t", "weightTransfer": "gloo"}
    template = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}
    run = defaulted_run(
        name=run_name,
        spec={"teacher": teacher, "learner": {"nodes": 1}, "checkpoint": {"volume": {"claimName": None}}},
    )
    run["metadata"]["namespace"] = namespace
    run["spec"]["checkpoint"]["volume"] = {"claimTemplate": template}
    core = client.CoreV1Api(api_client)
    create = {
        "ConfigMap": core.create_namespaced_config_map,
        "PersistentVolumeClaim": core.create_namespaced_persistent_volume_claim,
        "Service": core.create_namespaced_service,
        "Pod": core.create_namespaced_pod,
    }
    objects = [
        builders.build_config_map(run),
        builders.build_claim(run),
        *builders.build_services(run),
        placement.pinned(builders.build_learner_pod(run, 0, 10**6), "kwok-gpu-0"),
        *(builders.beside_run(p, run_name) for p in builders.build_server_pods(run)),
    ]
    # A queued run's pods carry its Kueue pod group in a label (dry run: no Kueue webhook here).
    group = kueue.group_name(run_name, run["metadata"]["uid"], 10**6)
    objects[4] = kueue.grouped(objects[4], run, "gpu-queue", group, total=4)
    assert len(objects) == 9  # ConfigMap, claim, 3 Services, a learner, 2 rollout servers, a teacher
    for obj in objects:
        created = create[obj["kind"]](namespace, obj, dry_run="All", field_validation="Strict")
        assert created.metadata.name == obj["metadata"]["name"]
