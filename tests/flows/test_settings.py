"""Settings: sources, precedence and clear errors naming the setting."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flows.settings import SettingsError, load_settings, pseudonym_key


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("PROSTATE_COHORT_"):
            monkeypatch.delenv(name)


def test_defaults_put_everything_under_the_output_root(tmp_path: Path) -> None:
    settings = load_settings(output_root=tmp_path / "out")
    assert settings.output_root == (tmp_path / "out").resolve()
    assert settings.resolved_database_url == f"sqlite:///{tmp_path / 'out' / 'provenance.sqlite'}"
    assert settings.threads.workers == 1
    assert settings.threads.per_worker() == os.cpu_count()


def test_toml_file_then_environment_then_explicit(tmp_path: Path, monkeypatch) -> None:
    config = tmp_path / "cohort.toml"
    config.write_text(
        f'output_root = "{tmp_path / "from-file"}"\n'
        "[demo]\npatients = 7\nseed = 3\n"
        "[segmentation]\nuse_mirroring = true\n"
    )
    settings = load_settings(config)
    assert (settings.demo.patients, settings.demo.seed) == (7, 3)
    assert settings.segmentation.use_mirroring is True
    assert settings.output_root == (tmp_path / "from-file").resolve()

    monkeypatch.setenv("PROSTATE_COHORT_DEMO__PATIENTS", "9")
    assert load_settings(config).demo.patients == 9  # environment beats the file
    assert load_settings(config).demo.seed == 3  # ... only for what it sets
    explicit = load_settings(config, output_root=tmp_path / "cli")
    assert explicit.output_root == (tmp_path / "cli").resolve()  # explicit beats both


def test_yaml_file_and_config_variable(tmp_path: Path, monkeypatch) -> None:
    config = tmp_path / "cohort.yaml"
    config.write_text(f"output_root: {tmp_path / 'y'}\nthreads:\n  workers: 1\n")
    monkeypatch.setenv("PROSTATE_COHORT_CONFIG", str(config))
    assert load_settings().output_root == (tmp_path / "y").resolve()


@pytest.mark.parametrize(
    ("overrides", "env", "named"),
    [
        ({"data_root": "/no/such/cohort"}, {}, "data_root: folder /no/such/cohort does not exist"),
        ({"database_url": "mysql://u:secret@h/db"}, {}, "database_url: database 'mysql'"),
        ({"database_url": "not a url"}, {}, "database_url: not a database URL"),
        ({}, {"PROSTATE_COHORT_THREADS__WORKERS": "zero"}, "threads.workers: Input should be"),
        ({}, {"PROSTATE_COHORT_THREADS__WORKERS": "0"}, "threads.workers: Input should be"),
        ({}, {"PROSTATE_COHORT_THREADS__WORKERS": "4096"}, "threads.workers"),
        ({}, {"PROSTATE_COHORT_SEGMENTATION__TILE_STEP_SIZE": "1.5"}, "tile_step_size"),
        ({}, {"PROSTATE_COHORT_SEGMENTATION__DEVICE": "tpu"}, "segmentation.device"),
    ],
)
def test_bad_settings_name_the_setting(tmp_path, monkeypatch, overrides, env, named) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as error:
        load_settings(output_root=tmp_path, **overrides)
    assert named in str(error.value)
    assert "secret" not in str(error.value)


def test_oversubscription_is_refused(tmp_path: Path, monkeypatch) -> None:
    cores = os.cpu_count() or 1
    monkeypatch.setenv("PROSTATE_COHORT_THREADS__WORKERS", str(cores))
    monkeypatch.setenv("PROSTATE_COHORT_THREADS__THREADS_PER_WORKER", "2")
    with pytest.raises(SettingsError, match=r"threads: .*exceeds the \d+ CPU cores"):
        load_settings(output_root=tmp_path)


def test_output_root_that_is_a_file_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SettingsError, match="output_root: .* is not a folder"):
        load_settings(output_root=blocker)


def test_unknown_setting_and_bad_file(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[demo]\npatiens = 3\n")
    with pytest.raises(SettingsError, match=r"demo.patiens: unknown setting"):
        load_settings(config)
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("demo = [\n")
    with pytest.raises(SettingsError, match="broken.toml"):
        load_settings(broken)


def test_public_dict_hides_secrets(tmp_path: Path) -> None:
    settings = load_settings(
        output_root=tmp_path,
        database_url="postgresql://cohort:hunter2@127.0.0.1:5432/cohort",
        pseudonym_key="very-secret-key",
    )
    text = str(settings.public_dict())
    assert "hunter2" not in text and "very-secret-key" not in text
    assert "postgresql://cohort:***@127.0.0.1:5432/cohort" in text


def test_pseudonym_key_file_is_created_once_private_and_stable(tmp_path: Path) -> None:
    settings = load_settings(output_root=tmp_path)
    first = pseudonym_key(settings)
    key_file = tmp_path / ".pseudonym-key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert len(first) == 64 and pseudonym_key(settings) == first
    assert pseudonym_key(load_settings(output_root=tmp_path, pseudonym_key="k2")) == "k2"


@pytest.mark.parametrize(
    ("toml", "env", "named"),
    [
        ("[steps.n4]\niteratons = [10]\n", {}, "steps.n4.iteratons: unknown setting"),
        ("", {"PROSTATE_COHORT_STEPS__N4__ITERATONS": "1"}, "steps.n4.iteratons: unknown"),
        ("", {"PROSTATE_COHORT_STEPS__DWI_FIT__ESTIMATR": "ols"}, "steps.dwi_fit.estimatr"),
        ("[steps.registration]\nthread = 2\n", {}, "steps.registration.thread: unknown"),
        ("", {"PROSTATE_COHORT_STEPS__SUSAN__SIGMA_MM": "1"}, "steps.susan.sigma_mm: unknown"),
        ("", {"PROSTATE_COHORT_STEP__N4__ITERATIONS": "1"}, "step: unknown setting"),
    ],
)
def test_unknown_step_parameters_are_refused(tmp_path, monkeypatch, toml, env, named) -> None:
    """A typo under [steps.*], in the file or in a nested environment variable, stops the
    program (pydantic-settings would drop an unknown name silently)."""
    config = tmp_path / "c.toml"
    config.write_text(toml)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as error:
        load_settings(config, output_root=tmp_path)
    assert named in str(error.value)
    for name in env:
        assert f"(environment variable {name})" in str(error.value)


def test_every_parameter_model_forbids_unknown_keys() -> None:
    from pydantic import BaseModel, ValidationError

    from flows.settings import StepSettings
    from tasks.segment import SegmentationParams

    models = [StepSettings, SegmentationParams]
    models += [field.annotation for field in StepSettings.model_fields.values()]
    for model in models:
        assert issubclass(model, BaseModel)
        with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
            model(typo=1)


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_a_sqlite_url_without_a_file_is_refused(tmp_path: Path, url: str) -> None:
    with pytest.raises(SettingsError, match="database_url: a SQLite URL needs a file"):
        load_settings(output_root=tmp_path, database_url=url)
