"""Image schemas: the shipped catalog, every diagnostic code with the place it points at, hostile files."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest

from compiler.ast import Span
from compiler.diagnostics import Severity
from compiler.images import (
    BUILTIN_DIR,
    CAPABILITIES,
    DATA_TYPES,
    ROLES,
    Catalog,
    DataPort,
    Image,
    Volume,
    check_source_path,
    load_builtin,
    load_catalog,
)
from compiler.source import SourceSet

GIB = 1024**3
MIB = 1024**2

VALID = """\
id: {id}
description: a test image
os: debian-12
source:
  path: {id}.qcow2
resources:
  cpu: {{min: 1, max: 4}}
  memory: {{min: 512MiB, max: 4GiB}}
capabilities: [cpu_hotplug, guest_agent]
roles: [general]
"""


def load_dir(directory: Path, **kw):
    sources = SourceSet()
    catalog, diags = load_catalog([directory], sources, **kw)
    return catalog, diags, sources


def load_one(tmp_path: Path, text: str | bytes, name: str = "img.yaml"):
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return load_dir(tmp_path)


def where(diag, sources) -> tuple[int, int]:
    assert diag.span is not None, diag
    return sources[diag.span.file].line_col(diag.span.start)


def pointed(diag, sources) -> str:
    return sources[diag.span.file].text[diag.span.start : diag.span.end]


def only(diags, code: str):
    found = [d for d in diags if d.code == code]
    assert len(found) == 1, diags
    return found[0]


# ------------------------------------------------------------------------------------------ the catalog


EXPECTED_IDS = {
    "linux-base", "linux-base-large", "linux-minimal",
    "image_id_123", "image_id_456", "image_id_789",
    "etl-extract", "etl-transform", "etl-load",
    "onboard-signup", "onboard-kyc", "onboard-provision", "onboard-welcome",
}


@pytest.fixture(scope="module")
def builtin() -> Catalog:
    catalog, diags = load_builtin(SourceSet())
    assert diags == []
    return catalog


def test_builtin_catalog_loads_cleanly_with_exactly_the_expected_ids(builtin):
    assert set(builtin.ids()) == EXPECTED_IDS
    assert list(builtin.ids()) == sorted(EXPECTED_IDS)
    assert len(builtin) == len(EXPECTED_IDS)
    files = {p.stem for p in BUILTIN_DIR.iterdir() if p.suffix in (".yaml", ".yml")}
    assert files == EXPECTED_IDS


def test_builtin_base_images(builtin):
    base = builtin.get("linux-base")
    assert base.os == "debian-12"
    assert (base.cpu_min, base.cpu_max) == (1, 16)
    assert (base.memory_min, base.memory_max) == (512 * MIB, 16 * GIB)
    assert base.capabilities == CAPABILITIES
    assert base.roles == ("general",)
    assert base.source_path == "linux-base.qcow2" and base.source_volume is None

    large = builtin.get("linux-base-large")
    assert large.os.startswith("debian")
    assert (large.cpu_min, large.cpu_max) == (1, 32)
    assert (large.memory_min, large.memory_max) == (2 * GIB, 64 * GIB)
    assert large.capabilities == base.capabilities

    minimal = builtin.get("linux-minimal")
    assert (minimal.cpu_min, minimal.cpu_max) == (1, 4)
    assert (minimal.memory_min, minimal.memory_max) == (256 * MIB, 4 * GIB)
    assert not minimal.supports("cpu_hotplug") and not minimal.supports("memory_balloon")
    assert minimal.supports("guest_agent")


def ports(ps) -> list[tuple[str, str, str | None]]:
    return [(p.name, p.type, p.format) for p in ps]


def test_builtin_service_images_chain_together(builtin):
    jpeg = "image/jpeg"
    assert builtin.get("image_id_123").roles == ("ingestion",)
    assert ports(builtin.get("image_id_123").outputs) == [("uploaded_image_url", "url", jpeg)]
    assert ports(builtin.get("image_id_456").inputs) == [("uploaded_image_url", "url", jpeg)]
    assert ports(builtin.get("image_id_456").outputs) == [("resized_image_url", "url", jpeg)]
    assert builtin.get("image_id_456").roles == ("transformation",)
    assert ports(builtin.get("image_id_789").inputs) == [("resized_image_url", "url", jpeg)]
    assert ports(builtin.get("image_id_789").outputs) == [("detected_objects", "json", "application/json")]
    assert builtin.get("image_id_789").roles == ("inference",)

    ndjson = "application/x-ndjson"
    assert ports(builtin.get("etl-extract").outputs) == [("raw_records", "records", ndjson)]
    assert ports(builtin.get("etl-transform").inputs) == [("raw_records", "records", ndjson)]
    assert ports(builtin.get("etl-transform").outputs) == [("clean_records", "records", ndjson)]
    assert ports(builtin.get("etl-load").inputs) == [("clean_records", "records", ndjson)]
    assert ports(builtin.get("etl-load").outputs) == [("load_report", "json", "application/json")]
    assert [builtin.get(i).roles for i in ("etl-extract", "etl-transform", "etl-load")] == [
        ("ingestion",), ("transformation",), ("storage",)]

    names = lambda ps: [p.name for p in ps]  # noqa: E731
    assert names(builtin.get("onboard-signup").outputs) == ["customer_profile"]
    assert names(builtin.get("onboard-kyc").inputs) == ["customer_profile"]
    assert names(builtin.get("onboard-kyc").outputs) == ["kyc_result"]
    assert names(builtin.get("onboard-provision").inputs) == ["customer_profile", "kyc_result"]
    assert ports(builtin.get("onboard-provision").outputs) == [("account_id", "string", None)]
    assert names(builtin.get("onboard-welcome").inputs) == ["account_id", "customer_profile"]
    assert names(builtin.get("onboard-welcome").outputs) == ["email_receipt"]
    assert [builtin.get(i).roles[0] for i in ("onboard-signup", "onboard-kyc", "onboard-provision",
                                              "onboard-welcome")] == ["ingestion", "validation", "general",
                                                                      "notification"]


def test_every_builtin_image_is_sane(builtin):
    for image in builtin.images.values():
        assert image.supports("guest_agent"), image.id
        assert image.source_path == f"{image.id}.qcow2"
        assert 1 <= image.cpu_min <= image.cpu_max
        assert 0 < image.memory_min <= image.memory_max
        assert set(image.roles) <= set(ROLES) and image.roles
        for port in image.inputs + image.outputs:
            assert port.type in DATA_TYPES
        # The id span points at the id in the file it came from.
        text = Path(image.path).read_text(encoding="utf-8")
        assert text[image.span.start : image.span.end] == image.id
        assert text[image.source_span.start : image.source_span.end] == image.source_path


def test_catalog_queries(builtin):
    assert [i.id for i in builtin.with_role("ingestion")] == ["etl-extract", "image_id_123", "onboard-signup"]
    assert builtin.with_role("nonsense") == ()
    assert builtin.get("nope") is None
    assert "linux-base" in builtin and "nope" not in builtin


def test_values_are_immutable(builtin):
    image = builtin.get("linux-base")
    with pytest.raises(dataclasses.FrozenInstanceError):
        image.cpu_max = 99  # type: ignore[misc]
    with pytest.raises(TypeError):
        builtin.images["x"] = image  # type: ignore[index]
    assert isinstance(image.capabilities, frozenset)
    assert isinstance(image.roles, tuple) and isinstance(image.inputs, tuple)
    assert not hasattr(image, "__dict__")


def test_fingerprint_follows_contents(tmp_path):
    (tmp_path / "a.yaml").write_text(VALID.format(id="a"))
    first, _, _ = load_dir(tmp_path)
    again, _, _ = load_dir(tmp_path)
    assert first.fingerprint == again.fingerprint
    (tmp_path / "a.yaml").write_text(VALID.format(id="a").replace("max: 4}", "max: 8}"))
    changed, _, _ = load_dir(tmp_path)
    assert changed.fingerprint != first.fingerprint
    assert changed.get("a").cpu_max == 8
    # A broken file counts too: fixing it must not hit a stale cache entry.
    (tmp_path / "b.yaml").write_text("id: [")
    broken, _, _ = load_dir(tmp_path)
    assert broken.fingerprint != changed.fingerprint


def test_sources_hold_every_file(tmp_path):
    (tmp_path / "a.yaml").write_text(VALID.format(id="a"))
    (tmp_path / "b.yml").write_text("- not a mapping\n")
    (tmp_path / "notes.txt").write_text("ignored")
    catalog, diags, sources = load_dir(tmp_path)
    assert set(sources) == {str(tmp_path / "a.yaml"), str(tmp_path / "b.yml")}
    assert catalog.ids() == ("a",)
    assert [d.code for d in diags] == ["F401"]


def test_volume_source(tmp_path):
    text = VALID.format(id="vol").replace("  path: vol.qcow2", "  volume: {pool: default, name: vol.qcow2}")
    catalog, diags, sources = load_one(tmp_path, text, "vol.yaml")
    assert diags == []
    image = catalog.get("vol")
    assert image.source_path is None and image.source_volume == Volume("default", "vol.qcow2")
    span = image.source_span
    assert sources[span.file].text[span.start : span.end] == "{pool: default, name: vol.qcow2}"


def test_source_path_is_normalized(tmp_path):
    text = VALID.format(id="n").replace("path: n.qcow2", "path: ./sub//dir/../n.qcow2")
    catalog, diags, _ = load_one(tmp_path, text, "n.yaml")
    assert diags == []
    assert catalog.get("n").source_path == "sub/n.qcow2"


def test_missing_directories(tmp_path):
    missing = tmp_path / "nope"
    catalog, diags = load_catalog([missing], SourceSet())
    assert diags == [] and len(catalog) == 0
    catalog, diags = load_catalog([missing], SourceSet(), require_dirs=True)
    assert [d.code for d in diags] == ["F405"] and str(missing) in diags[0].message


# ------------------------------------------------------------------------------------------ F401


@pytest.mark.parametrize(
    "text, line, col, words",
    [
        ("id: x\nos: [debian\n", 3, 1, "not valid YAML"),  # unclosed flow list: reported where it gives up
        ("id: x\n  os: y\n", 2, 5, "not valid YAML"),
        ("id: x\nos: \x01\n", 2, 5, "character"),
        ("a: 1\n---\nb: 2\n", 2, 1, "not valid YAML"),
        ("", 1, 1, "empty"),
        ("# only a comment\n", 1, 1, "empty"),
        ("- id: x\n- os: y\n", 1, 1, "mapping, not a list"),
        ("\n\njust a string\n", 3, 1, "mapping, not a string"),
        ("base: &b {cpu: 1}\nother: *b\n", 2, 8, "alias"),
    ],
)
def test_f401_not_a_yaml_mapping(tmp_path, text, line, col, words):
    catalog, diags, sources = load_one(tmp_path, text)
    d = only(diags, "F401")
    assert len(diags) == 1
    assert where(d, sources) == (line, col)
    assert words in d.message
    assert len(catalog) == 0


def test_f401_position_counts_characters_not_bytes(tmp_path):
    # Marks from the YAML reader are character offsets; multi-byte text before the error must not shift them.
    catalog, diags, sources = load_one(tmp_path, "description: Überprüfung 😀\nos: {a: 1\n")
    d = only(diags, "F401")
    assert where(d, sources) == (3, 1)
    catalog, diags, sources = load_one(tmp_path, "description: 😀😀\nos: ]\n")
    assert where(only(diags, "F401"), sources) == (2, 5)


def test_f401_not_utf8(tmp_path):
    catalog, diags, sources = load_one(tmp_path, "id: café\nos: x\n".encode("utf-8") + b"bad: \xff\xfe\n")
    d = only(diags, "F401")
    assert "UTF-8" in d.message
    assert where(d, sources) == (3, 6)
    assert "0xff" in d.label


# ------------------------------------------------------------------------------------------ F402


def f402(tmp_path, text, name="img.yaml"):
    catalog, diags, sources = load_one(tmp_path, text, name)
    assert diags and all(d.code == "F402" for d in diags), diags
    return catalog, diags, sources


def test_f402_missing_field_points_at_its_parent(tmp_path):
    text = VALID.format(id="img").replace("os: debian-12\n", "").replace("cpu: {min: 1, max: 4}", "cpu: {min: 1}")
    catalog, diags, sources = f402(tmp_path, text)
    by_msg = {d.message: d for d in diags}
    assert set(by_msg) == {"missing field `os`", "missing field `resources.cpu.max`"}
    assert where(by_msg["missing field `os`"], sources) == (1, 1)
    d = by_msg["missing field `resources.cpu.max`"]
    assert where(d, sources) == (6, 3) and pointed(d, sources) == "cpu"
    assert "img" not in catalog


def test_f402_unknown_field_suggests(tmp_path):
    text = VALID.format(id="img").replace("roles:", "rolse:").replace("max: 4GiB", "maxx: 4GiB")
    catalog, diags, sources = f402(tmp_path, text)
    unknown = {d.message: d for d in diags if d.message.startswith("unknown field")}
    d = unknown["unknown field `rolse`"]
    assert where(d, sources) == (10, 1) and d.help == "did you mean `roles`?"
    d = unknown["unknown field `resources.memory.maxx`"]
    assert where(d, sources) == (8, 25) and d.help == "did you mean `max`?"
    # The misspelt `maxx` also leaves `max` missing, reported at `memory`.
    missing = [d for d in diags if d.message == "missing field `resources.memory.max`"]
    assert [where(d, sources) for d in missing] == [(8, 3)]


def test_f402_wrong_types(tmp_path):
    text = """\
id: img
description: 12
os:
source: linux.qcow2
resources:
  cpu: {min: one, max: 2.5}
  memory: [1GiB]
capabilities: guest_agent
"""
    catalog, diags, sources = f402(tmp_path, text)
    got = {(where(d, sources), d.message) for d in diags}
    assert got == {
        ((2, 14), "`description` should be a string, not a whole number"),
        ((3, 1), "`os` has no value"),
        ((4, 9), "`source` should be a mapping, not a string"),
        ((6, 14), "`resources.cpu.min` should be a whole number of vCPUs, not a string"),
        ((6, 24), "`resources.cpu.max` should be a whole number of vCPUs, not a number"),
        ((7, 11), "`resources.memory` should be a mapping, not a list"),
        ((8, 15), "`capabilities` should be a list of capabilities, not a string"),
    }


def test_f402_quantities(tmp_path):
    text = VALID.format(id="img").replace("{min: 512MiB, max: 4GiB}", "{min: 512, max: 4Gib}")
    catalog, diags, sources = f402(tmp_path, text)
    got = {where(d, sources): d for d in diags}
    assert got[(8, 17)].message == "`resources.memory.min` needs a byte unit"
    assert got[(8, 27)].message == "`resources.memory.max` `4Gib` is not a size"
    assert got[(8, 27)].help == "did you mean `GiB`?"

    for bad, words in [("5m", "needs a byte unit"), ("1.5B", "whole number of bytes"), ("0GiB", "more than zero"),
                       ("-1GiB", "not a size"), ("9999999999999TiB", "too large")]:
        text = VALID.format(id="img").replace("max: 4GiB", f"max: {bad}")
        _, diags, sources = f402(tmp_path, text)
        assert len(diags) == 1 and words in diags[0].message, (bad, diags)
        assert where(diags[0], sources) == (8, 30)


def test_f402_cpu_counts(tmp_path):
    for bad, words in [("0", "at least 1"), ("-2", "at least 1"), ("5000", "more vCPUs"), ("0x10", "decimal"),
                       ("1:30", "decimal"), ("2.0", "whole number of vCPUs, not a number"), ("'4'", "not a string")]:
        text = VALID.format(id="img").replace("min: 1, max: 4", f"min: 1, max: {bad}")
        _, diags, sources = f402(tmp_path, text)
        assert len(diags) == 1 and words in diags[0].message, (bad, diags)
        assert where(diags[0], sources) == (7, 22)


def test_f402_min_greater_than_max(tmp_path):
    text = VALID.format(id="img").replace("min: 1, max: 4", "min: 8, max: 4").replace(
        "min: 512MiB, max: 4GiB", "min: 8GiB, max: 4GiB")
    catalog, diags, sources = f402(tmp_path, text)
    got = sorted((where(d, sources), d.message) for d in diags)
    assert got == [
        ((7, 14), "`resources.cpu.min` (8) is greater than `resources.cpu.max` (4)"),
        ((8, 17), "`resources.memory.min` (8GiB) is greater than `resources.memory.max` (4GiB)"),
    ]
    cpu = next(d for d in diags if "cpu" in d.message)
    assert [sources[lb.span.file].line_col(lb.span.start) for lb in cpu.labels] == [(7, 22)]
    assert len(catalog) == 0


def test_f402_unknown_capability_role_and_type(tmp_path):
    text = VALID.format(id="img").replace("cpu_hotplug, guest_agent", "cpu_hotplug, gest_agent").replace(
        "roles: [general]", "roles: [general, inferance]\ninputs:\n  - {name: pic, type: URL}\n")
    catalog, diags, sources = f402(tmp_path, text)
    got = {where(d, sources): (d.message, d.help) for d in diags}
    assert got == {
        (9, 29): ("unknown capability `gest_agent`", "did you mean `guest_agent`?"),
        (10, 18): ("unknown role `inferance`", "did you mean `inference`?"),
        (12, 23): ("unknown data type `URL`", "did you mean `url`?"),
    }


def test_f402_bad_names_and_repeats(tmp_path):
    text = VALID.format(id="img") + """\
inputs:
  - {name: 9lives, type: url}
  - {name: pic, type: url, format: image/png}
  - {name: pic, type: bytes}
"""
    text = text.replace("roles:", "roles: [general]\nroles:")
    catalog, diags, sources = load_one(tmp_path, text)
    got = {(where(d, sources), d.severity, d.message) for d in diags}
    assert got == {
        ((11, 1), Severity.ERROR, "field `roles` is given twice"),
        ((13, 12), Severity.ERROR, "`inputs[0].name` `9lives` is not a valid name"),
        ((15, 12), Severity.ERROR, "`pic` is listed twice in `inputs`"),
    }


def test_repeated_capability_is_only_a_warning(tmp_path):
    text = VALID.format(id="img").replace("[cpu_hotplug, guest_agent]", "[cpu_hotplug, guest_agent, cpu_hotplug]")
    catalog, diags, sources = load_one(tmp_path, text, "img.yaml")
    d = only(diags, "F402")
    assert d.severity is Severity.WARNING and where(d, sources) == (9, 42)
    assert catalog.get("img").capabilities == {"cpu_hotplug", "guest_agent"}


def test_f402_source_needs_exactly_one_of_path_and_volume(tmp_path):
    text = VALID.format(id="img").replace("  path: img.qcow2", "  path: img.qcow2\n  volume: {pool: p, name: v}")
    _, diags, sources = f402(tmp_path, text)
    assert [(where(d, sources), d.message) for d in diags] == [((6, 3), "`source` has both `path` and `volume`")]

    text = VALID.format(id="img").replace("source:\n  path: img.qcow2", "source: {}")
    _, diags, sources = f402(tmp_path, text)
    assert [(where(d, sources), d.message) for d in diags] == [((4, 1), "`source` needs a `path` or a `volume`")]

    text = VALID.format(id="img").replace("  path: img.qcow2", "  volume: {pool: ../x}")
    _, diags, sources = f402(tmp_path, text)
    assert sorted((where(d, sources), d.message) for d in diags) == [
        ((5, 3), "missing field `source.volume.name`"),
        ((5, 18), "`source.volume.pool` `../x` is not a valid pool"),
    ]


# ------------------------------------------------------------------------------------------ F403, F404


def test_an_earlier_folder_shadows_a_later_one(tmp_path):
    user, builtin = tmp_path / "user", tmp_path / "builtin"
    user.mkdir()
    builtin.mkdir()
    (user / "web.yaml").write_text(VALID.format(id="web").replace("max: 4}", "max: 2}"))
    (builtin / "web.yaml").write_text(VALID.format(id="web"))
    sources = SourceSet()
    catalog, diags = load_catalog([user, builtin], sources)
    assert diags == []  # a program's own images/ may override the built-in catalog
    assert catalog.get("web").cpu_max == 2 and catalog.get("web").path == str(user / "web.yaml")


def test_f403_same_directory_yaml_and_yml(tmp_path):
    (tmp_path / "web.yaml").write_text(VALID.format(id="web"))
    (tmp_path / "web.yml").write_text("\n" + VALID.format(id="web"))
    catalog, diags, sources = load_dir(tmp_path)
    d = only(diags, "F403")
    assert d.span.file.endswith("web.yml") and where(d, sources) == (2, 5)
    assert catalog.get("web").path.endswith("web.yaml")


def test_f404_id_must_match_file_name(tmp_path):
    catalog, diags, sources = load_one(tmp_path, VALID.format(id="linux-base"), "linux-bsae.yaml")
    d = only(diags, "F404")
    assert len(diags) == 1
    assert where(d, sources) == (1, 5) and pointed(d, sources) == "linux-base"
    assert "linux-bsae" in d.message
    assert len(catalog) == 0


# ------------------------------------------------------------------------------------------ F310


@pytest.mark.parametrize(
    "path, words",
    [
        ("../../etc/shadow", "escapes the image root"),
        ("a/../../b", "escapes the image root"),
        ("..", "escapes the image root"),
        ("/etc/shadow", "absolute"),
        ("", "empty"),
        ("a\0b", "NUL"),
        ("a/..", "image root itself"),
    ],
)
def test_check_source_path_refuses(path, words):
    span = Span("x.flow", 3, 9)
    d = check_source_path(path, span)
    assert d is not None and d.code == "F310" and d.span == span and words in d.message
    assert "\0" not in d.message


def test_check_source_path_message():
    d = check_source_path("../../etc/shadow", Span("x", 0, 1))
    assert d.message == "image source `../../etc/shadow` escapes the image root"


@pytest.mark.parametrize("path", ["linux-base.qcow2", "sub/dir/x.qcow2", "./x.qcow2", "a/../b.qcow2", "..x/y"])
def test_check_source_path_accepts(path):
    assert check_source_path(path, Span("x", 0, 1)) is None


@pytest.mark.parametrize(
    "source, col",
    [('"../../etc/shadow"', 9), ("/etc/shadow", 9), ('"a\\0b"', 9), ("''", 9)],
)
def test_f310_in_image_schema(tmp_path, source, col):
    text = VALID.format(id="img").replace("  path: img.qcow2", f"  path: {source}")
    catalog, diags, sources = load_one(tmp_path, text)
    d = only(diags, "F310")
    assert len(diags) == 1
    assert where(d, sources) == (5, col)
    assert len(catalog) == 0


# ------------------------------------------------------------------------------------------ hostile files


def _hostile(tmp_path, content: str | bytes):
    start = time.monotonic()
    catalog, diags, sources = load_one(tmp_path, content, "hostile.yaml")
    assert time.monotonic() - start < 5
    assert len(catalog) == 0
    assert diags and all(d.severity is Severity.ERROR for d in diags)
    for d in diags:
        if d.span is not None:
            assert 0 <= d.span.start <= d.span.end <= len(sources[d.span.file].text)
    return diags, sources


def test_alias_bomb_is_refused(tmp_path):
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    diags, sources = _hostile(tmp_path, "\n".join(lines) + "\n")
    d = only(diags, "F401")
    assert "alias" in d.message and where(d, sources) == (2, 10)


def test_merge_keys_are_aliases_too(tmp_path):
    diags, _ = _hostile(tmp_path, "defaults: &d {os: x}\nid: hostile\n<<: *d\n")
    assert [d.code for d in diags] == ["F401"]


@pytest.mark.parametrize(
    "text",
    [
        "[" * 10_000 + "]" * 10_000,
        "- " * 10_000 + "x\n",
        "{a: " * 10_000 + "1" + "}" * 10_000,
        "a:\n" + "".join("  " * i + "- \n" for i in range(1, 300)),
        "".join("  " * i + "a:\n" for i in range(300)),
    ],
    ids=["flow-lists", "compact-lists", "flow-maps", "block-lists", "block-maps"],
)
def test_deep_nesting_is_refused(tmp_path, text):
    diags, _ = _hostile(tmp_path, text)
    assert [d.code for d in diags] == ["F401"]
    assert "nested more than" in diags[0].message


def test_too_many_values_is_refused(tmp_path):
    diags, _ = _hostile(tmp_path, "id: hostile\nroles: [" + ", ".join(["general"] * 30_000) + "]\n")
    assert [d.code for d in diags] == ["F401"] and "more than" in diags[0].message


def test_oversized_file_is_refused(tmp_path):
    # With "éx" (3 bytes) the limit falls inside an "é": still "too large", not "not UTF-8".
    for filler in ("x", "éx"):
        diags, _ = _hostile(tmp_path, "description: " + filler * (2 * 1024 * 1024) + "\n")
        assert [d.code for d in diags] == ["F401"] and "larger than" in diags[0].message


@pytest.mark.parametrize(
    "content",
    [
        bytes(range(256)) * 8,
        b"\x00\x01\x02\x03 id: x",
        b"\xef\xbb\xbfid: [\x00",
        "id: \ud800".encode("utf-8", "surrogatepass"),
        b"\xff\xfei\x00d\x00:\x00",
        b"\t\t\t: : : - - - ? ? ? [ { ! & * | > % @ `",
        b"!!python/object/apply:os.system ['echo pwned']",
        b"id: !!binary aGVsbG8=\n",
    ],
)
def test_garbage_gives_diagnostics_not_exceptions(tmp_path, content):
    diags, _ = _hostile(tmp_path, content)
    assert {d.code for d in diags} <= {"F401", "F402", "F404"}


def test_huge_numbers(tmp_path):
    huge = str(10**400)
    text = VALID.format(id="hostile").replace("min: 1, max: 4", f"min: {huge}, max: -{huge}").replace(
        "max: 4GiB", f"max: {huge}GiB").replace("min: 512MiB", f"min: {huge}.5MiB")
    diags, sources = _hostile(tmp_path, text)
    assert {d.code for d in diags} == {"F402"}
    assert len(diags) == 4
    assert {where(d, sources)[0] for d in diags} == {7, 8}


def test_number_too_long_for_int(tmp_path):
    # Past 4300 digits int() refuses to convert; that must still be a diagnostic.
    digits = "9" * 5000
    text = VALID.format(id="hostile").replace("max: 4GiB", f"max: {digits}GiB").replace("max: 4}", f"max: {digits}}}")
    diags, _ = _hostile(tmp_path, text)
    assert sorted(d.message for d in diags) == [
        "`resources.cpu.max` is more vCPUs than any VM can have",
        "`resources.memory.max` is too large",
    ]


def test_unusual_keys(tmp_path):
    diags, sources = _hostile(tmp_path, "? [a, b]\n: 1\n1: 2\nnull: 3\n")
    assert {d.message for d in diags if d.code == "F402"} >= {
        "field names should be plain words, not a list",
        "field names should be plain words, not a whole number",
        "field names should be plain words, not null",
    }


def test_types_are_exported():
    assert {f.name for f in dataclasses.fields(Image)} >= {
        "id", "description", "os", "source_path", "source_volume", "cpu_min", "cpu_max", "memory_min",
        "memory_max", "capabilities", "roles", "inputs", "outputs", "path", "span", "source_span"}
    assert [f.name for f in dataclasses.fields(DataPort)] == ["name", "type", "format", "span"]
