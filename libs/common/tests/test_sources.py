"""The model source policy: what an app may name as a model, and which addresses a node may
reach. No test here connects anywhere: hosts resolve through stub resolvers."""

from __future__ import annotations

import ipaddress

import msgspec
import pytest

from stipple_common.errors import InvalidInput
from stipple_common.settings import InvalidSettings
from stipple_common.sources import (
    SourcePolicy,
    address_problem,
    check_reference,
    check_task_sources,
    load_policy,
    url_sha256,
    vet_addresses,
)
from stipple_common.taskspec import parse_task

SHA = "ab" * 32
POLICY = SourcePolicy(hosts=["civitai.com", "*.example.org"], http_hosts=["mirror.example.org"])


def test_the_default_policy_allows_hf_ids_and_no_url() -> None:
    policy = SourcePolicy()
    check_reference("runwayml/stable-diffusion-v1-5", None, policy)
    with pytest.raises(InvalidInput) as caught:
        check_reference(f"https://civitai.com/api/download/models/1#sha256={SHA}", None, policy)
    assert caught.value.field == "model"
    assert caught.value.value == f"https://civitai.com/api/download/models/1#sha256={SHA}"
    assert "not allowed by policy: host 'civitai.com'" in caught.value.reason


@pytest.mark.parametrize(
    "url",
    [
        f"https://civitai.com/x.safetensors#sha256={SHA}",
        f"https://CIVITAI.com./x.safetensors#sha256={SHA}",
        f"https://cdn.example.org/x#sha256={SHA}",
        f"https://a.b.example.org:8443/x#sha256={SHA}",
        f"http://mirror.example.org/x#sha256={SHA}",
    ],
)
def test_allowed_urls(url: str) -> None:
    check_reference(url, None, POLICY)


@pytest.mark.parametrize(
    ("url", "words"),
    [
        (f"https://example.org/x#sha256={SHA}", "host 'example.org'"),  # *.suffix is subdomains only
        (f"https://evilcivitai.com/x#sha256={SHA}", "host 'evilcivitai.com'"),
        (f"https://civitai.com.evil.net/x#sha256={SHA}", "host 'civitai.com.evil.net'"),
        (f"http://civitai.com/x#sha256={SHA}", "plain http to 'civitai.com'"),
        (f"http://cdn.example.org/x#sha256={SHA}", "plain http"),
        (f"ftp://civitai.com/x#sha256={SHA}", "scheme 'ftp'"),
        ("https://civitai.com/x", "must carry the file's sha256"),
        ("https://civitai.com/x#sha256=123", "64 hexadecimal digits"),
    ],
)
def test_refused_urls_name_the_field_the_value_and_why(url: str, words: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        check_reference(url, None, POLICY, field="loras[0].model")
    assert caught.value.field == "loras[0].model"
    assert caught.value.value == url
    assert words in caught.value.reason


def test_sha256_may_be_given_beside_the_url_and_must_agree() -> None:
    check_reference("https://civitai.com/x", SHA, POLICY)
    with pytest.raises(InvalidInput, match="differs"):
        check_reference(f"https://civitai.com/x#sha256={SHA}", "cd" * 32, POLICY)
    check_reference("https://civitai.com/x", None, msgspec.structs.replace(POLICY, require_sha256=False))
    assert url_sha256(f"https://civitai.com/x#foo=1&SHA256={SHA.upper()}") == SHA
    assert url_sha256("https://civitai.com/x") is None


def test_hf_ids_can_be_turned_off_and_local_paths_are_not_this_policys_business() -> None:
    policy = SourcePolicy(hf=False)
    with pytest.raises(InvalidInput, match="does not fetch Hugging Face repos"):
        check_reference("stabilityai/sdxl-vae", None, policy, field="vae")
    check_reference("/models/x.safetensors", None, policy)
    check_reference("file:///models/x.safetensors", None, policy)


def test_the_policy_comes_from_the_environment_as_json() -> None:
    env = {"STIPPLE_MODEL_SOURCES": '{"hosts": ["*.civitai.com"], "require_sha256": false, "hf": false}'}
    policy = load_policy(env)
    assert policy == SourcePolicy(hosts=["*.civitai.com"], require_sha256=False, hf=False)
    assert load_policy({}) == SourcePolicy()
    for bad in ('{"hostz": []}', "not json", '{"hosts": ["a/b"]}', '{"http_hosts": ["*.x.org"]}'):
        with pytest.raises(InvalidSettings, match="STIPPLE_MODEL_SOURCES"):
            load_policy({"STIPPLE_MODEL_SOURCES": bad})


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("127.0.0.1", "loopback"),
        ("169.254.169.254", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("100.64.0.1", "not globally routable"),  # carrier-grade NAT
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fe80::1", "link-local"),
        ("fc00::1", "private"),
        ("ff02::1", "multicast"),
        ("::ffff:127.0.0.1", "loopback (inside ::ffff:7f00:1)"),
        ("::ffff:169.254.169.254", "link-local"),
        ("2002:0a00:0001::1", "private (inside 2002:a00:1::1)"),  # 6to4 of 10.0.0.1
        ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 of 169.254.169.254
        ("64:ff9b::7f00:1", "loopback"),
        ("2001:0:4136:e378:8000:63bf:f5ff:fffe", "private"),  # Teredo; client 10.0.0.1
    ],
)
def test_address_classes_that_are_refused(address: str, problem: str) -> None:
    found = address_problem(ipaddress.ip_address(address))
    assert found is not None
    assert found.startswith(problem), found


@pytest.mark.parametrize("address", ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946", "::ffff:8.8.8.8"])
def test_public_addresses_pass(address: str) -> None:
    assert address_problem(ipaddress.ip_address(address)) is None


class Stub:
    """A resolver answering from a table, remembering what it was asked."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    def __call__(self, host: str, port: int, timeout_s: float | None) -> list[str]:
        self.asked.append(host)
        if host not in self.answers:
            raise OSError(f"unknown host {host}")
        return self.answers[host]


def test_a_host_is_refused_if_any_of_its_addresses_is_not_public() -> None:
    resolver = Stub({"good.example.org": ["93.184.216.34"], "mixed.example.org": ["93.184.216.34", "10.0.0.7"]})
    assert vet_addresses("good.example.org", 443, POLICY, resolver=resolver) == ["93.184.216.34"]
    with pytest.raises(InvalidInput) as caught:
        vet_addresses("mixed.example.org", 443, POLICY, resolver=resolver)
    assert caught.value.value == "mixed.example.org"
    assert caught.value.reason == "refused address 10.0.0.7: private"


def test_address_literals_are_judged_without_dns_and_private_hosts_are_explicit() -> None:
    resolver = Stub({})
    with pytest.raises(InvalidInput, match="loopback"):
        vet_addresses("127.0.0.1", 80, POLICY, resolver=resolver)
    with pytest.raises(InvalidInput, match="link-local"):
        vet_addresses("[::ffff:169.254.169.254]", 80, POLICY, resolver=resolver)
    assert resolver.asked == []
    trusted = SourcePolicy(hosts=["127.0.0.1"], private_hosts=["127.0.0.1"])
    assert vet_addresses("127.0.0.1", 80, trusted, resolver=resolver) == ["127.0.0.1"]
    with pytest.raises(InvalidInput, match="cannot resolve"):
        vet_addresses("nowhere.example.org", 80, POLICY, resolver=resolver)


def test_check_task_sources_names_the_task_field() -> None:
    url = "https://civitai.com/api/download/models/7"
    spec = parse_task({"base_model": "tiny-sd", "prompt": "a cat", "loras": [{"model": "tiny/lora"}, {"model": url}]})
    with pytest.raises(InvalidInput) as caught:
        check_task_sources(spec, POLICY)
    assert caught.value.field == "loras[1].model"
    assert caught.value.value == url
    check_task_sources(spec, msgspec.structs.replace(POLICY, require_sha256=False))
    vae = parse_task({"base_model": "tiny-sd", "prompt": "a cat", "vae": "http://10.0.0.1/vae.safetensors"})
    with pytest.raises(InvalidInput) as caught:
        check_task_sources(vae, POLICY)
    assert caught.value.field == "vae"
