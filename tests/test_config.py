"""Configuration: the embedded default, env overrides, and clear errors naming the bad key."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from cascade.config import load_config, parse_config
from cascade.errors import ConfigError

GOOD = """
tiers:
  - {name: a, backend: transformers, model: smollm2-135m}
  - {name: b, backend: openai, model: gpt-4o-mini, options: {base_url: "http://127.0.0.1:1/v1"}}
policies:
  cascade: {chain: [a, b]}
"""


def test_embedded_default_is_the_qwen_cpu_chain():
    cfg = load_config(environ={})
    assert cfg.default_policy_name == "cascade"
    assert cfg.policies["cascade"].chain == ["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]
    assert cfg.server.host == "127.0.0.1" and cfg.server.port == 8000
    assert all(t.backend == "transformers" for t in cfg.tiers)


def test_environment_overrides(tmp_path):
    cfg = load_config(environ={"CASCADE_PORT": "9123", "CASCADE_HOST": "127.0.0.2",
                               "CASCADE_LEDGER_PATH": str(tmp_path / "l.sqlite"),
                               "CASCADE_MODEL_CACHE": str(tmp_path / "m")})
    assert cfg.server.port == 9123 and cfg.server.host == "127.0.0.2"
    assert cfg.ledger_path() == tmp_path / "l.sqlite" and cfg.model_cache_dir() == tmp_path / "m"
    p = tmp_path / "c.yaml"
    p.write_text(GOOD)
    assert load_config(environ={"CASCADE_CONFIG": str(p)}).policies["cascade"].chain == ["a", "b"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tiers: [\n  {name: a, backend: transformers", "invalid config"),
        ("[1, 2]", "top level must be a mapping"),
        (GOOD.replace("model: smollm2-135m", "model: smollm2-135m, colour: red"), "tiers.0.colour: unknown key"),
        (GOOD.replace("backend: transformers", "backend: tpu"), "tiers.0.backend: unknown backend 'tpu'"),
        (GOOD.replace("chain: [a, b]", "chain: [a, c]"), "policies.cascade.chain: unknown tier 'c'"),
        (GOOD.replace("model: smollm2-135m}", "model: m, price: {input_per_1m: cheap}}"),
         "tiers.0.price.input_per_1m"),
        (GOOD.replace("model: smollm2-135m}", "model: m, threshold: 1.5}"), "tiers.0.threshold"),
        # a boolean is no number (pydantic alone would read `true` as 1.0: a tier that never keeps an answer)
        (GOOD.replace("model: smollm2-135m}", "model: m, threshold: true}"),
         "tiers.0.threshold: must be a number, not a boolean (true)"),
        (GOOD + "server: {port: false}\n", "server.port: must be a number, not a boolean (false)"),
        (GOOD.replace("{chain: [a, b]}", "{chain: [a, b], thresholds: {a: true}}"),
         "policies.cascade.thresholds: a: must be a number, not a boolean (true)"),
        (GOOD + "drift: {escalation_rate: [false, 0.5]}\n",
         "drift.escalation_rate: 0: must be a number, not a boolean (false)"),
        # one secret under two keys: the second key and its user tier could never be used
        (GOOD + "user_tiers: {free: {}, paid: {}}\nauth: {keys: [{id: k1, user_tier: free, sha256: " + "a" * 64
         + "}, {id: k2, user_tier: paid, sha256: " + "a" * 64 + "}]}\n",
         "keys 'k1' and 'k2' have the same sha256"),
        (GOOD.replace("{chain: [a, b]}", "{chain: []}"), "policies.cascade.chain"),
        (GOOD + "default_policy: nope\n", "default_policy: unknown policy 'nope'"),
        (GOOD.replace("name: b,", "name: a,"), "duplicate tier name"),
        # a key given twice is refused, not silently last-one-wins; a merge key may still be overridden
        (GOOD + "default_policy: cascade\ndefault_policy: other\n",
         "the key 'default_policy' is given twice at line"),
        (GOOD.replace("{chain: [a, b]}", "{chain: [a, b], chain: [b]}"), "the key 'chain' is given twice"),
        # deeper than PyYAML's recursive composer goes (it was a RecursionError: a traceback, a reload's 500)
        (GOOD + "a: " + "[" * 2000 + "]" * 2000 + "\n", "collections nested too deeply"),
        (GOOD + "a:\n" + "".join("  " * (i + 1) + "b:\n" for i in range(1500)), "collections nested too deeply"),
        # a character YAML refuses (a NUL, a pasted escape) was only "malformed YAML", saying neither what nor where
        ("tiers: [{name: a\x00}]\n", "special characters are not allowed (character #x0000) at line 1, column 17"),
        ("server: {}\ndefault_policy: \"cas\x1bcade\"\n",
         "special characters are not allowed (character #x001b) at line 2, column 21"),
    ],
)
def test_malformed_configs_name_the_bad_key(tmp_path, text, message):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(p, environ={})
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_yaml_merge_keys_may_be_overridden(tmp_path):
    p = tmp_path / "merge.yaml"
    p.write_text(GOOD.replace("model: smollm2-135m}", "model: m, price: &p {input_per_1m: 1.0, output_per_1m: 2.0}}")
                 .replace("model: gpt-4o-mini,", "model: gpt-4o-mini, price: {<<: *p, input_per_1m: 3.0},"))
    a, b = load_config(p, environ={}).tiers
    assert (a.price.input_per_1m, b.price.input_per_1m, b.price.output_per_1m) == (1.0, 3.0, 2.0)


@pytest.mark.parametrize(("section", "var"), [("server: [1, 2]", "CASCADE_PORT"), ("ledger: x", "CASCADE_LEDGER_PATH"),
                                              ("models: m", "CASCADE_MODEL_CACHE")])
def test_an_env_override_into_a_section_that_is_no_mapping_is_the_one_line_error(tmp_path, section, var):
    p = tmp_path / "bad.yaml"
    p.write_text(GOOD + section + "\n")
    with pytest.raises(ConfigError) as err:
        load_config(p, environ={var: "9123"})
    name = section.split(":")[0]
    assert f"{name}: Input should be a valid dictionary" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("load", [lambda env: load_config(environ=env), lambda env: parse_config({}, environ=env)])
def test_an_environ_that_is_no_mapping_is_a_config_error(load):
    """``environ=[("CASCADE_PORT", "9000")]`` (pairs, not a mapping) was a raw AttributeError from deep inside."""
    with pytest.raises(ConfigError, match="environ must be a mapping of variable names to values.*got list"):
        load([("CASCADE_PORT", "9000")])


def test_missing_file_and_bad_env_port(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml", environ={})
    with pytest.raises(ConfigError, match="server.port"):
        load_config(environ={"CASCADE_PORT": "eighty"})


def test_calibrator_artifact_is_loaded(tmp_path):
    from calibration import TemperatureScaling, save_calibrator
    from cascade.engine import build_calibrator

    art = save_calibrator(TemperatureScaling(feature="min_logprob", temperature=2.5), tmp_path / "cal.json")
    cfg = parse_config({"tiers": [{"name": "a", "backend": "transformers", "model": "m",
                                   "calibrator": {"artifact": str(art)}}],
                        "policies": {"p": {"chain": ["a"]}}})
    cal = build_calibrator(cfg.tiers[0].calibrator, tier="a")
    assert cal.feature == "min_logprob" and cal.temperature == 2.5
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ConfigError, match="tiers.a.calibrator: .*not valid JSON"):
        build_calibrator(cfg.tiers[0].calibrator.model_copy(update={"artifact": str(tmp_path / "broken.json")}),
                         tier="a")


def test_cli_reports_a_bad_config_in_one_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(GOOD.replace("chain: [a, b]", "chain: [a, zz]"))
    out = subprocess.run([sys.executable, "-m", "cascade.cli", "ask", "--config", str(p), "hi"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cascade: error: invalid config")
    assert "policies.cascade.chain: unknown tier 'zz'" in lines[0]


def test_relative_artifact_paths_are_read_next_to_the_config_file(tmp_path):
    from calibration.calibrators import TemperatureScaling, save_calibrator
    from cascade.engine import build_calibrator

    d = tmp_path / "deploy"
    save_calibrator(TemperatureScaling("mean_logprob", 2.0), d / "calibrators" / "a.json")
    save_calibrator(TemperatureScaling("mean_logprob", 3.0), d / "calibrators" / "route.json")
    absolute = tmp_path / "abs.json"
    save_calibrator(TemperatureScaling("mean_logprob", 4.0), absolute)
    p = d / "c.yaml"
    p.write_text(GOOD.replace("model: smollm2-135m}", "model: smollm2-135m, "
                              "calibrator: {artifact: calibrators/a.json}}")
                 .replace("cascade: {chain: [a, b]}", "cascade: {chain: [a, b], calibrators: "
                          "{a: {artifact: calibrators/route.json}, b: {artifact: " + str(absolute) + "}}}"))
    cfg = load_config(p, environ={})  # the current directory is the repository, not deploy/
    assert cfg.tier("a").calibrator.artifact == str(d / "calibrators" / "a.json")
    cals = cfg.policies["cascade"].calibrators
    assert cals["a"].artifact == str(d / "calibrators" / "route.json") and cals["b"].artifact == str(absolute)
    assert build_calibrator(cfg.tier("a").calibrator, tier="a").temperature == 2.0
    # a config given as data (not a file) keeps them as written
    import yaml

    assert parse_config(yaml.safe_load(p.read_text())).tier("a").calibrator.artifact == "calibrators/a.json"


def test_a_calibrator_naming_a_method_must_give_its_parameters():
    """A tier with no calibrator, or one naming only its feature, is the identity (temperature 1); one that
    names its method and forgets the parameter is an error naming it, not a silent temperature of 1."""
    def calibrator(text: str):  # noqa: ANN202
        import yaml

        data = yaml.safe_load(GOOD.replace("model: smollm2-135m}", f"model: smollm2-135m{text}}}"))
        return parse_config(data, environ={}).tier("a").calibrator

    assert calibrator("").params == {"temperature": 1.0}
    assert calibrator(", calibrator: {feature: min_logprob}").params == {"temperature": 1.0}
    assert calibrator(", calibrator: {method: temperature, params: {temperature: 2.5}}").params == {"temperature": 2.5}
    with pytest.raises(ConfigError, match=r"tiers\.0\.calibrator.*missing parameter\(s\) \['temperature'\]"):
        calibrator(", calibrator: {method: temperature}")


def test_a_config_path_that_cannot_be_expanded_or_is_empty_is_one_clear_error(tmp_path):
    """`--config ~nosuchuser/c.yaml` was Path.expanduser's bare RuntimeError; `--config ""` read the current
    directory as a file."""
    with pytest.raises(ConfigError, match=r"config file: cannot expand '~no-such-user-cascade/c.yaml': no such user"):
        load_config("~no-such-user-cascade/c.yaml", environ={})
    with pytest.raises(ConfigError, match="config file: empty path"):
        load_config("", environ={})
    artifact = GOOD.replace("model: smollm2-135m}",
                            "model: smollm2-135m, calibrator: {artifact: '~no-such-user-c/a.json'}}")
    import yaml

    # the key is named (the line said only "calibrator artifact", of which tier or policy left to guess)
    with pytest.raises(ConfigError, match=r"^tiers\.0\.calibrator\.artifact: cannot expand '~no-such-user-c/a.json'"):
        parse_config(yaml.safe_load(artifact), environ={}, base_dir=".")
    p = tmp_path / "c.yaml"
    p.write_text(GOOD.replace("{chain: [a, b]}", "{chain: [a, b], calibrators: {b: {artifact: ''}}}"))
    with pytest.raises(ConfigError, match=r"^policies\.cascade\.calibrators\.b\.artifact: empty path"):
        load_config(p, environ={})


SEMANTIC_BASE = GOOD + "user_tiers: {free: {}}\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # a default max_tokens at or above the context leaves no room for a prompt: every request that asks for
        # none was refused by the tier (context overflow) and escalated, silently
        (SEMANTIC_BASE.replace("model: smollm2-135m}", "model: smollm2-135m, max_tokens: 64, context_length: 64}"),
         "tiers.0: max_tokens (64) must be below context_length (64)"),
        # the margin and top-k entropy features need two alternatives per token: with top_logprobs 0 or 1 they
        # were 0 for every answer, a constant confidence (the tier always kept, or always escalated)
        (SEMANTIC_BASE.replace("model: smollm2-135m}",
                               "model: smollm2-135m, top_logprobs: 0, calibrator: {feature: mean_topk_entropy}}"),
         "tiers.0.calibrator: reads 'mean_topk_entropy', computed from each token's top alternatives, but tier 'a' "
         "has top_logprobs 0"),
        (SEMANTIC_BASE.replace("model: smollm2-135m}", "model: smollm2-135m, top_logprobs: 1}").replace(
            "{chain: [a, b]}", "{chain: [a, b], calibrators: {a: {artifact: x.json, feature: mean_margin}}}"),
         "policies.cascade.calibrators.a: reads 'mean_margin'"),
        (SEMANTIC_BASE.replace("model: smollm2-135m}", "model: smollm2-135m, top_logprobs: 1}")
         + "shadows: {s: {of: cascade, calibrators: {a: {feature: mean_margin}}}}\n",
         "shadows.s.calibrators.a: reads 'mean_margin'"),
        # the window keeps at most `window` labels: more needed and the ECE alarm could never fire
        (SEMANTIC_BASE + "drift: {window: 5, min_labels: 30, max_ece: 0.1}\n",
         "drift: min_labels (30) must not be above window (5)"),
        # an empty list of user tiers was read as none given: the shadow ran on every request of its policy
        (SEMANTIC_BASE + "shadows: {s: {of: cascade, user_tiers: []}}\n",
         "shadows.s.user_tiers: must name at least one user tier"),
        # a request that names no max_tokens gets the tier's: past the server's limit it was answered at a length
        # no client may ask for (the tier's 64 tokens on a server whose limit is 16)
        (SEMANTIC_BASE.replace("model: smollm2-135m}", "model: smollm2-135m, max_tokens: 17}")
         + "server: {max_tokens_limit: 16}\n",
         "tiers.0.max_tokens (17) is above server.max_tokens_limit (16): a request that names no max_tokens gets "
         "the tier's"),
        (SEMANTIC_BASE + "server: {max_tokens_limit: 16}\n",  # both tiers' max_tokens left at the default, 64
         "tiers.0.max_tokens (64, the default) is above server.max_tokens_limit (16)"),
        # tokens_per_minute counts a request's prompt and the tier's max_tokens when it names none: at or below
        # that, every such request of the user tier's keys was refused as too large (429), though it asked nothing
        (GOOD + "user_tiers: {free: {tokens_per_minute: 64}}\n",
         "user_tiers.free.tokens_per_minute (64) must be above the max_tokens of tier 'a' (64), which its keys "
         "may use"),
        (GOOD.replace("model: gpt-4o-mini,", "model: gpt-4o-mini, max_tokens: 200,")
         + "user_tiers: {free: {tokens_per_minute: 100, allowed_models: [cascade]}}\n",
         "user_tiers.free.tokens_per_minute (100) must be above the max_tokens of tier 'b' (200)"),
    ],
)
def test_contradictory_configs_are_refused_at_load_naming_the_key(tmp_path, text, message):
    refused_in_one_line(tmp_path, text, message)


def refused_in_one_line(tmp_path, text: str, message: str) -> None:  # noqa: ANN001
    """The config ``text``, written to a file, is refused at load with one line that says ``message``."""
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(p, environ={})
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("extra", [
    "",  # what the checks above leave alone
    "drift: {window: 5, min_labels: 30}\n",  # no max_ece: min_labels is not used
    "drift: {window: 30, min_labels: 30, max_ece: 0.1}\n",
    "shadows: {s: {of: cascade, user_tiers: [free]}}\n",
    "shadows: {s: {of: cascade, calibrators: {a: {feature: mean_margin}}}}\n",  # top_logprobs 5 by default
    "server: {max_tokens_limit: 64}\n",  # a tier's max_tokens at the limit (tier b's default, 64)
])
def test_the_consistent_neighbours_of_those_configs_load(tmp_path, extra):
    p = tmp_path / "c.yaml"
    p.write_text(SEMANTIC_BASE.replace("model: smollm2-135m}", "model: smollm2-135m, max_tokens: 63, "
                                       "context_length: 64}") + extra)
    load_config(p, environ={})


async def test_a_reload_to_a_contradictory_config_is_refused_and_the_running_one_stays(tmp_path):
    import yaml

    from cascade.engine import Engine
    from cascade.recalibrate import reload_engine

    p = tmp_path / "c.yaml"
    p.write_text(SEMANTIC_BASE + f"ledger: {{path: {tmp_path / 'l.sqlite'}}}\n")
    engine = await Engine.open(load_config(p, environ={}), preload=False)
    try:
        data = yaml.safe_load(p.read_text())
        data["tiers"][0].update(threshold=0.9, top_logprobs=0, calibrator={"feature": "mean_margin"})
        p.write_text(yaml.safe_dump(data))
        with pytest.raises(ConfigError, match=r"tiers\.0\.calibrator: reads 'mean_margin'"):
            reload_engine(engine, str(p))
        assert engine.tiers["a"].config.threshold == 0.5 and engine.tiers["a"].calibrator.feature == "mean_logprob"
    finally:
        await engine.close()


@pytest.mark.parametrize("user_tier", [
    "{tokens_per_minute: 65}",  # room for the tiers' 64 and a prompt
    "{tokens_per_minute: 64, allowed_models: [a]}",  # tier a alone, whose max_tokens is 63
])
def test_a_tokens_per_minute_above_the_tiers_max_tokens_loads(tmp_path, user_tier):
    p = tmp_path / "c.yaml"
    p.write_text(GOOD.replace("model: smollm2-135m}", "model: smollm2-135m, max_tokens: 63}")
                 + f"user_tiers: {{free: {user_tier}}}\n")
    assert load_config(p, environ={}).user_tiers["free"].tokens_per_minute in (64, 65)


async def test_a_reload_keeps_the_user_tiers_when_a_tokens_per_minute_is_below_a_running_tiers_max_tokens(tmp_path):
    """A tier's max_tokens waits for a restart while user tiers apply at once: a file that lowers both (it loads)
    set a tokens_per_minute below the running tier's 64, refusing every request that named no max_tokens."""
    import yaml

    from cascade.engine import Engine
    from cascade.recalibrate import reload_engine

    p = tmp_path / "c.yaml"
    p.write_text(SEMANTIC_BASE + f"ledger: {{path: {tmp_path / 'l.sqlite'}}}\n")
    engine = await Engine.open(load_config(p, environ={}), preload=False)
    try:
        data = yaml.safe_load(p.read_text())
        for t in data["tiers"]:
            t["max_tokens"] = 32
        data["user_tiers"]["free"] = {"tokens_per_minute": 40}
        p.write_text(yaml.safe_dump(data))
        out = reload_engine(engine, str(p))
        assert engine.config.user_tiers["free"].tokens_per_minute is None
        assert any("section 'user_tiers' (on the running tiers, user_tiers.free.tokens_per_minute (40) must be above "
                   "the max_tokens of tier 'a' (64)" in n for n in out["not_applied"]), out["not_applied"]
        data["user_tiers"]["free"] = {"tokens_per_minute": 65}  # above the running 64: applied at once
        p.write_text(yaml.safe_dump(data))
        reload_engine(engine, str(p))
        assert engine.config.user_tiers["free"].tokens_per_minute == 65
    finally:
        await engine.close()


def test_post_admin_reload_of_a_tier_max_tokens_past_the_limit_is_refused_and_changes_nothing(tmp_path, serve_app):
    """The load check holds for a reload too: a 422 naming both keys, and the running thresholds stay."""
    import httpx

    p = tmp_path / "c.yaml"
    p.write_text(SEMANTIC_BASE.replace("model: smollm2-135m}", "model: smollm2-135m, max_tokens: 8}").replace(
        "gpt-4o-mini,", "gpt-4o-mini, max_tokens: 16,") + "server: {max_tokens_limit: 16}\n"
                 f"ledger: {{path: {tmp_path / 'l.sqlite'}}}\n")
    srv = serve_app(load_config(p, environ={}), config_path=str(p))
    p.write_text(p.read_text().replace("max_tokens: 8}", "max_tokens: 40, threshold: 0.9}"))
    r = httpx.post(srv.url + "/admin/reload", timeout=60)
    assert r.status_code == 422 and r.json()["error"]["code"] == "reload_refused", r.text
    assert "tiers.0.max_tokens (40) is above server.max_tokens_limit (16)" in r.json()["error"]["message"]
    p.write_text(p.read_text().replace("max_tokens: 40, threshold: 0.9}", "max_tokens: 8, threshold: 0.9}"))
    r = httpx.post(srv.url + "/admin/reload", timeout=60)  # the same threshold within the limit: applied, and a
    tier = r.json()["tiers"]["a"]                           # change from 0.5, which the refused reload had kept
    assert r.status_code == 200 and tier["threshold"] == 0.9 and tier["changed"] is True, r.text


def test_a_malformed_base_url_is_quoted_without_its_user_info(tmp_path, serve_app):
    """A base_url may carry basic credentials (https://user:password@host): one that does not parse (a port that
    is not a number) was quoted whole in the error, and so in a reload's answer to its HTTP client."""
    import httpx

    p = tmp_path / "c.yaml"
    p.write_text("tiers: [{name: b, backend: openai, model: gpt-4o-mini,\n"
                 "         options: {base_url: 'http://127.0.0.1:1/v1'}}]\n"
                 f"policies: {{cascade: {{chain: [b]}}}}\nledger: {{path: {tmp_path / 'l.sqlite'}}}\n")
    srv = serve_app(load_config(p, environ={}), config_path=str(p))
    p.write_text(p.read_text().replace("http://127.0.0.1:1/v1", "https://alice:hunter2pass@api.example.com:80a/v1"))
    r = httpx.post(srv.url + "/admin/reload", timeout=60)
    assert r.status_code == 200 and "hunter2pass" not in r.text and "alice" not in r.text, r.text
    assert "base_url: must be an http:// or https:// URL with a host, got 'https://***@api.example.com:80a/v1'" \
        in r.json()["warnings"][0]


@pytest.mark.parametrize("where", ["tiers.a.calibrator", "policies.cascade.calibrators.a", "shadows.s.calibrators.a"])
async def test_an_artifact_reading_top_alternatives_on_a_tier_without_them_is_refused_when_the_engine_opens(
        tmp_path, where):
    """The config cannot see an artifact's feature (it is in the file): one fit on mean_margin, served by a tier
    with top_logprobs 1, is refused as the engine builds its calibrators (was a constant confidence)."""
    import yaml

    from calibration.calibrators import TemperatureScaling, save_calibrator
    from cascade.engine import Engine

    art = {"artifact": str(save_calibrator(TemperatureScaling("mean_margin", 2.0), tmp_path / "margin.json"))}
    data = yaml.safe_load(SEMANTIC_BASE)
    data["tiers"][0]["top_logprobs"] = 1
    data["ledger"] = {"path": str(tmp_path / "l.sqlite")}
    if where.startswith("tiers"):
        data["tiers"][0]["calibrator"] = art
    elif where.startswith("policies"):
        data["policies"]["cascade"]["calibrators"] = {"a": art}
    else:
        data["shadows"] = {"s": {"of": "cascade", "calibrators": {"a": art}}}
    config = parse_config(data, environ={})  # (loads: the artifact is not opened here)
    with pytest.raises(ConfigError, match=rf"^{re.escape(where)}: reads 'mean_margin', computed from each token's "
                                          r"top alternatives, but tier 'a' has top_logprobs 1"):
        await Engine.open(config, preload=False)
    data["tiers"][0]["top_logprobs"] = 2  # two alternatives a token: the same artifact serves
    async with await Engine.open(parse_config(data, environ={}), preload=False) as engine:
        assert engine.resolve("cascade").name == "cascade"


KEY = "a" * 64


@pytest.mark.parametrize(("text", "read", "expected"), [
    # each bound's own edge is inside it: a threshold of 1.0 escalates all but certain answers, a free tier costs 0
    (GOOD.replace("model: smollm2-135m}", "model: smollm2-135m, threshold: 1.0}"), lambda c: c.tier("a").threshold,
     1.0),
    (GOOD.replace("{chain: [a, b]}", "{chain: [a, b], thresholds: {a: 1.0}}"),
     lambda c: c.policies["cascade"].thresholds["a"], 1.0),
    (GOOD + "shadows: {s: {of: cascade, thresholds: {a: 1.0}, sample_rate: 1.0, sample_budget_usd: 0.01}}\n",
     lambda c: (c.shadows["s"].thresholds["a"], c.shadows["s"].sample_rate), (1.0, 1.0)),
    (GOOD.replace("model: smollm2-135m}",
                  "model: smollm2-135m, price: {input_per_1m: 0, output_per_1m: 0, cached_input_per_1m: 0}}"),
     lambda c: c.tier("a").price.cost(1_000_000, 1_000_000, 500_000), 0.0),
    (GOOD + "server: {port: 65535, max_body_bytes: 1024, max_header_bytes: 1024}\n",
     lambda c: (c.server.port, c.server.max_body_bytes, c.server.max_header_bytes), (65535, 1024, 1024)),
    (GOOD + f"user_tiers: {{free: {{}}}}\nauth: {{keys: [{{id: {'k' * 64}, user_tier: free, sha256: {KEY}}}]}}\n",
     lambda c: c.auth.keys[0].id, "k" * 64),
])
def test_a_value_at_the_edge_of_its_bound_loads(tmp_path, text, read, expected):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    assert read(load_config(p, environ={})) == expected


@pytest.mark.parametrize(("text", "message"), [
    # a negative price made a tier's calls earn money: the ledger's costs, the budgets and the reports went down
    (GOOD.replace("model: smollm2-135m}", "model: smollm2-135m, price: {input_per_1m: -0.01}}"),
     "tiers.0.price.input_per_1m: Input should be greater than or equal to 0"),
    (GOOD.replace("model: smollm2-135m}", "model: smollm2-135m, price: {output_per_1m: -0.01}}"),
     "tiers.0.price.output_per_1m: Input should be greater than or equal to 0"),
    (GOOD.replace("model: smollm2-135m}", "model: smollm2-135m, price: {cached_input_per_1m: -0.01}}"),
     "tiers.0.price.cached_input_per_1m: Input should be greater than or equal to 0"),
    (GOOD.replace("model: smollm2-135m}", "model: smollm2-135m, threshold: 1.0001}"),
     "tiers.0.threshold: Input should be less than or equal to 1"),
    (GOOD.replace("{chain: [a, b]}", "{chain: [a, b], thresholds: {a: -0.0001}}"),
     "policies.cascade.thresholds: threshold for 'a' must be within [0, 1], got -0.0001"),
    (GOOD + "server: {port: 65536}\n", "server.port: Input should be less than or equal to 65535"),
    # the server hashes a bearer key to lowercase hex: an uppercase digest would never match, a key that never works
    (GOOD + "user_tiers: {free: {}}\nauth: {keys: [{id: k1, user_tier: free, sha256: " + "A" * 64 + "}]}\n",
     "auth.keys.0.sha256: String should match pattern"),
    (GOOD + f"user_tiers: {{free: {{}}}}\nauth: {{keys: [{{id: {'k' * 65}, user_tier: free, sha256: {KEY}}}]}}\n",
     "auth.keys.0.id: String should have at most 64 characters"),
    (GOOD + f"user_tiers: {{free: {{}}}}\nauth: {{keys: [{{id: k1, user_tier: paid, sha256: {KEY}}}]}}\n",
     "auth.keys.0.user_tier: unknown user tier 'paid'"),
    (GOOD + f"user_tiers: {{free: {{}}}}\nauth: {{keys: [{{id: k1, user_tier: free, sha256: {KEY}}}, "
     f"{{id: k1, user_tier: free, sha256: {'b' * 64}}}]}}\n", "auth.keys: duplicate key id"),
    (GOOD + "user_tiers: {free: {}}\nauth: {anonymous_user_tier: paid}\n",
     "auth.anonymous_user_tier: unknown user tier 'paid'"),
    # a budget of 0 refuses every request, a spend limit of 0 every key: neither is "no limit" (leave it out)
    (GOOD + "user_tiers: {free: {cost_budget_usd: 0}}\n",
     "user_tiers.free.cost_budget_usd: Input should be greater than 0"),
    (GOOD + "shadows: {s: {of: cascade, sample_rate: 1.01, sample_budget_usd: 1}}\n",
     "shadows.s.sample_rate: Input should be less than or equal to 1"),
    (GOOD + "shadows: {s: {of: cascade, sample_rate: 0.1}}\n",
     "shadows.s.sample_budget_usd: must be above 0 when sample_rate is above 0"),
])
def test_a_value_just_past_its_bound_is_refused_naming_the_key(tmp_path, text, message):
    refused_in_one_line(tmp_path, text, message)


def test_a_config_that_leaves_settings_out_gets_the_defaults_the_docs_give():
    """The README's configuration reference lists the server, ledger, cache and models defaults, and
    docs/failure-handling.md the retry and breaker ones: a config that leaves them out runs with those (a log level,
    a request limit or a retry count nobody chose would otherwise change unnoticed)."""
    import yaml

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text().split("## Configuration", 1)[1]
    reference = yaml.safe_load(readme.split("```yaml\n", 1)[1].split("```", 1)[0])
    failure = (root / "docs" / "failure-handling.md").read_text().splitlines()
    retry = yaml.safe_load(next(s for s in failure if s.strip().startswith("retry: {") and "# defaults" in s))
    breaker = yaml.safe_load(next(s for s in failure if s.strip().startswith("breaker: {")))
    cfg = parse_config(yaml.safe_load(GOOD), environ={})
    for section in ("server", "ledger", "cache", "models"):
        assert getattr(cfg, section).model_dump() == reference[section], section
    tier = cfg.tier("b")
    assert tier.retry.model_dump() == {**retry["retry"], "jitter_seed": None}
    assert tier.breaker.model_dump() == breaker["breaker"]
    # a tier's own defaults (no page lists them; the README's example tier spells two of them out)
    assert (tier.threshold, tier.max_tokens, tier.top_logprobs, tier.timeout_s) == (0.5, 64, 5, 120.0)
    assert tier.calibrator.params == {"temperature": 1.0} and tier.price.cost(10**6, 10**6) == 0.0


def test_an_empty_variable_overrides_nothing_and_the_given_file_wins_over_cascade_config(tmp_path):
    cfg = load_config(environ={"CASCADE_HOST": "", "CASCADE_PORT": "", "CASCADE_LEDGER_PATH": "",
                               "CASCADE_MODEL_CACHE": "", "CASCADE_CONFIG": ""})  # the embedded default
    assert (cfg.server.host, cfg.server.port, cfg.ledger.path, cfg.models.cache_dir) == (
        "127.0.0.1", 8000, "~/.local/share/cascade-engine/ledger.sqlite", "~/.cache/cascade-engine/models")
    given, other = tmp_path / "given.yaml", tmp_path / "other.yaml"
    given.write_text(GOOD + "server: {port: 9001}\n")
    other.write_text(GOOD.replace("chain: [a, b]", "chain: [b]"))
    assert load_config(given, environ={"CASCADE_CONFIG": str(other)}).policies["cascade"].chain == ["a", "b"]
    assert load_config(environ={"CASCADE_CONFIG": str(other)}).policies["cascade"].chain == ["b"]
    # the environment over the file
    assert load_config(given, environ={"CASCADE_PORT": "9123"}).server.port == 9123
    assert load_config(given, environ={}).server.port == 9001
