"""Configs: pydantic models from YAML plus ``a.b=c`` overrides; clear errors before any work."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloudburst import config
from cloudburst.config import (
    ConfigError,
    DataConfig,
    IngestConfig,
    apply_overrides,
    job_config_class,
    load_config,
)
from cloudburst.tuning.config import SweepConfig

JobConfig = config.DatasetJobConfig  # the dataset job config (embedded defaults)
CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems(err: pytest.ExceptionInfo) -> list[str]:
    return [line for line in str(err.value).splitlines() if line.startswith("  - ")]


# ---------------------------------------------------------------------------- loading


def test_embedded_defaults():
    cfg = load_config(JobConfig)
    assert cfg.name == "demo"
    assert cfg.ingest.source is None  # synthetic data
    assert cfg.ingest.target == "outputs/demo/precip.zarr"
    assert cfg.ingest.bins == 100 and cfg.ingest.coarsen == 1 and cfg.ingest.bbox is None
    assert (cfg.synthetic.ny, cfg.synthetic.nx, cfg.synthetic.freq) == (48, 48, "1D")
    assert (cfg.synthetic.center_lat, cfg.synthetic.center_lon) == (20.5, 75.5)
    assert (cfg.data.windows.length, cfg.data.windows.size) == (8, 32)
    assert cfg.data.split.scheme == "seasons" and cfg.data.split.every == 5
    assert cfg.data.scaling == "unit" and cfg.data.transform == "none"
    assert cfg.data.store == cfg.ingest.target
    assert cfg.storage.endpoint_url is None and cfg.storage.options == {}


def test_defaults_are_not_shared_between_instances():
    a, b = load_config(JobConfig), load_config(JobConfig)
    a.storage.options["x"] = 1
    assert b.storage.options == {}


def test_from_yaml(tmp_path):
    path = write(
        tmp_path,
        """
name: chirps
ingest:
  source: s3://bucket/chirps/*.nc
  target: outputs/chirps/precip.zarr
  bbox: [74.3, 19.3, 76.7, 21.7]
  chunks: {time: 64, y: 48}
  time_start: 1981-01-01
data:
  windows: {length: 8, size: 32, stride: 4, doy: [150, 300]}
  split: {scheme: years, train_years: [1981, 2010], test_years: [2011, 2019]}
storage: {endpoint_url: "http://127.0.0.1:9000", anon: true}
""",
    )
    cfg = load_config(JobConfig, path)
    assert cfg.name == "chirps"
    assert cfg.ingest.source == "s3://bucket/chirps/*.nc"
    assert cfg.ingest.bbox == (74.3, 19.3, 76.7, 21.7)
    assert cfg.ingest.chunks == {"time": 64, "y": 48}
    assert cfg.ingest.time_start == "1981-01-01"  # a date stays a string
    assert cfg.data.windows.doy == (150, 300) and cfg.data.windows.stride == 4
    assert cfg.data.split.train_years == (1981, 2010)
    assert cfg.data.store == "outputs/chirps/precip.zarr"  # follows the ingest target
    assert cfg.storage.anon is True
    assert cfg.synthetic.ny == 48  # untouched sections keep their defaults


def test_explicit_data_store_is_kept(tmp_path):
    path = write(tmp_path, "ingest: {target: a.zarr}\ndata: {store: b.zarr}\n")
    assert load_config(JobConfig, path).data.store == "b.zarr"


def test_empty_yaml_is_defaults(tmp_path):
    assert load_config(JobConfig, write(tmp_path, "# nothing\n")) == load_config(JobConfig)


JOB_CONFIGS = [p for p in sorted(CONFIGS.glob("*.yaml")) if p.name != "serve.yaml"]


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=lambda p: p.name)
def test_shipped_job_configs_are_valid(path):
    cls = job_config_class(path)
    cfg = load_config(cls, path)
    assert cfg.name if cls in (JobConfig, SweepConfig) else cfg.run.name


def test_serve_deploy_config_is_not_taken_for_a_job():
    # serve.yaml is checked against Ray Serve's own schema in test_jobs
    with pytest.raises(ConfigError, match="Ray Serve deploy config.*serve run"):
        job_config_class(CONFIGS / "serve.yaml")


# ---------------------------------------------------------------------------- overrides


def test_overrides_are_parsed_as_yaml():
    cfg = load_config(
        JobConfig,
        overrides=[
            "ingest.bins=64",
            "ingest.bbox=[1, 2, 3.5, 4]",
            "ingest.variable=null",
            "ingest.chunks={time: 5}",
            "synthetic.resolution_deg=0.1",
            "synthetic.seed=7",
            "synthetic.advection=[0.5, -1]",
            "storage.anon=true",
            "synthetic.start=2001-06-01",
            "data.windows.doy=[150, 300]",
        ],
    )
    assert cfg.ingest.bins == 64 and isinstance(cfg.ingest.bins, int)
    assert cfg.ingest.bbox == (1.0, 2.0, 3.5, 4.0)
    assert cfg.ingest.variable is None
    assert cfg.ingest.chunks == {"time": 5}
    assert cfg.synthetic.resolution_deg == 0.1 and cfg.synthetic.seed == 7
    assert cfg.synthetic.advection == (0.5, -1.0)
    assert cfg.storage.anon is True
    assert cfg.synthetic.start == "2001-06-01"
    assert cfg.data.windows.doy == (150, 300)


def test_override_value_may_contain_equals_and_colons():
    cfg = load_config(JobConfig, overrides=["ingest.source=s3://b/k.nc?version=3"])
    assert cfg.ingest.source == "s3://b/k.nc?version=3"


def test_override_empty_value_is_empty_string():
    assert load_config(JobConfig, overrides=["name="]).name == ""


def test_overrides_win_over_the_file_and_keep_siblings(tmp_path):
    path = write(tmp_path, "ingest: {bins: 20, coarsen: 2}\n")
    cfg = load_config(JobConfig, path, overrides=["ingest.bins=30", "ingest.bins=40"])
    assert cfg.ingest.bins == 40 and cfg.ingest.coarsen == 2


def test_override_into_a_null_section(tmp_path):
    path = write(tmp_path, "ingest:\nname: x\n")  # ingest: null
    cfg = load_config(JobConfig, path, overrides=["ingest.bins=8"])
    assert cfg.ingest.bins == 8


def test_apply_overrides_nested_new_sections():
    tree = apply_overrides({"a": {"b": 1}}, ["a.c.d=2", " a.b = 3"])
    assert tree == {"a": {"b": 3, "c": {"d": 2}}}


# ---------------------------------------------------------------------------- errors


def test_bins_too_small_names_field_value_and_limit():
    with pytest.raises(ConfigError) as err:
        load_config(JobConfig, overrides=["ingest.bins=1"])
    (line,) = problems(err)
    assert "ingest.bins" in line and "got 1" in line
    assert "greater than or equal to 2" in line
    assert "embedded defaults" in str(err.value)


def test_unknown_field():
    with pytest.raises(ConfigError) as err:
        load_config(JobConfig, overrides=["ingest.binz=10"])
    (line,) = problems(err)
    assert "ingest.binz" in line and "got 10" in line and "unknown field" in line


def test_literal_not_allowed_lists_the_choices():
    with pytest.raises(ConfigError) as err:
        load_config(JobConfig, overrides=["synthetic.freq=2h"])
    (line,) = problems(err)
    assert "synthetic.freq" in line and "'2h'" in line
    assert "allowed" in line and "'1D'" in line and "'1h'" in line


@pytest.mark.parametrize("bbox", ["[5, 0, 5, 1]", "[6, 0, 5, 1]", "[0, 2, 1, 1]"])
def test_bbox_must_be_ordered(bbox):
    with pytest.raises(ConfigError) as err:
        load_config(JobConfig, overrides=[f"ingest.bbox={bbox}"])
    (line,) = problems(err)
    assert "ingest.bbox" in line and "W < E" in line and "S < N" in line


def test_bbox_needs_four_numbers():
    with pytest.raises(ConfigError, match="ingest.bbox"):
        load_config(JobConfig, overrides=["ingest.bbox=[1, 2, 3]"])


def test_every_problem_is_listed_once_with_the_file_name(tmp_path):
    path = write(
        tmp_path,
        "ingest: {bins: 0, coarsen: 0}\ndata: {scaling: log, windows: {length: 0}}\nbogus: 1\n",
    )
    with pytest.raises(ConfigError) as err:
        load_config(JobConfig, path)
    lines = problems(err)
    fields = sorted(line.split(":")[0].strip(" -") for line in lines)
    assert fields == [
        "bogus",
        "data.scaling",
        "data.windows.length",
        "ingest.bins",
        "ingest.coarsen",
    ]
    assert str(path) in str(err.value).splitlines()[0]


def test_wrong_type():
    with pytest.raises(ConfigError) as err:
        load_config(JobConfig, overrides=["synthetic.ny=many"])
    (line,) = problems(err)
    assert "synthetic.ny" in line and "'many'" in line and "integer" in line


def test_chunk_validation():
    with pytest.raises(ConfigError, match="chunk dimensions must be among time, y, x"):
        load_config(JobConfig, overrides=["ingest.chunks={lev: 2}"])
    with pytest.raises(ConfigError, match="chunk sizes must be >= 1"):
        load_config(JobConfig, overrides=["ingest.chunks={time: 0}"])


def test_split_years_needs_both_ranges():
    with pytest.raises(ConfigError) as err:
        load_config(JobConfig, overrides=["data.split.scheme=years"])
    (line,) = problems(err)
    assert line.strip().startswith("- data.split") and "train_years and test_years" in line


def test_doy_range():
    with pytest.raises(ConfigError, match=r"data.windows.doy.*1\.\.366"):
        load_config(JobConfig, overrides=["data.windows.doy=[0, 400]"])


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("ingest.bins", "not of the form key=value"),
        ("=5", "empty key"),
        (" =5", "empty key"),
    ],
)
def test_bad_override_syntax(override, words):
    with pytest.raises(ConfigError, match=words) as err:
        load_config(JobConfig, overrides=[override])
    assert override.strip() in str(err.value)


def test_override_through_a_value(tmp_path):
    path = write(tmp_path, "name: demo\n")
    with pytest.raises(ConfigError, match="'name' is a value, not a section"):
        load_config(JobConfig, path, overrides=["name.first=x"])


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="cannot read config") as err:
        load_config(JobConfig, path)
    assert str(path) in str(err.value) and "No such file" in str(err.value)


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(JobConfig, tmp_path)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_non_mapping_yaml(tmp_path, text):
    with pytest.raises(ConfigError, match="must be a mapping of fields"):
        load_config(JobConfig, write(tmp_path, text))


def test_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(JobConfig, write(tmp_path, "ingest: {bins: [1, 2\n"))


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_section_models_validate_on_their_own():
    assert load_config(IngestConfig, overrides=["coarsen=4"]).coarsen == 4
    with pytest.raises(ConfigError, match="scaling"):
        load_config(DataConfig, overrides=["scaling=minmax"])
    cfg = load_config(IngestConfig)
    with pytest.raises(ValueError):
        cfg.bins = 1  # validate_assignment
