"""One typed settings object for the whole platform.

Sources, highest precedence first:

1. values given by the command line (``load_settings(**overrides)``);
2. environment variables ``PROSTATE_COHORT_<NAME>``, nested with ``__``
   (``PROSTATE_COHORT_THREADS__WORKERS=2``, ``PROSTATE_COHORT_DATABASE_URL=...``);
3. a TOML or YAML file (``--config FILE`` or ``PROSTATE_COHORT_CONFIG=FILE``);
4. the defaults below.

Invalid settings fail at start with a :class:`SettingsError` whose message names each bad
setting (``threads.workers: ...``). The image-processing steps never read this object:
flows pass each step its own parameter model (``settings.steps.<step>``).
"""

from __future__ import annotations

import os
import secrets
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from tasks.bias import N4Params
from tasks.denoise import SusanParams, T2DenoiseParams
from tasks.dwi import DwiFitParams
from tasks.qc_flags import QcThresholds
from tasks.register import RegistrationParams

ENV_PREFIX = "PROSTATE_COHORT_"
CONFIG_ENV = f"{ENV_PREFIX}CONFIG"
KEY_FILE_NAME = ".pseudonym-key"
DATABASE_FILE_NAME = "provenance.sqlite"
#: The demo's output root when none is given: its own folder, never a cohort's output_root.
DEMO_OUTPUT_ROOT = Path("demo-output")
SUPPORTED_DATABASES = ("sqlite", "postgresql")

_config_file: ContextVar[Path | None] = ContextVar("prostate_cohort_config_file", default=None)


class SettingsError(ValueError):
    """Invalid configuration; the message names every bad setting."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ThreadSettings(_Section):
    """CPU parallelism. ``workers × threads_per_worker`` must not exceed the machine's cores.

    Every worker runs one patient step at a time with at most ``threads_per_worker`` threads
    in ITK/SimpleITK, torch and BLAS, so the machine is never oversubscribed.
    """

    workers: int = Field(1, ge=1, le=512, description="Patients processed in parallel.")
    threads_per_worker: int | None = Field(
        None, ge=1, le=512, description="Threads per worker; default: cores // workers."
    )

    def per_worker(self, cores: int | None = None) -> int:
        """Threads each worker may use (at least 1)."""
        cores = cores or os.cpu_count() or 1
        return self.threads_per_worker or max(1, cores // self.workers)

    @model_validator(mode="after")
    def _fits_the_machine(self) -> ThreadSettings:
        cores = os.cpu_count() or 1
        if self.workers * self.per_worker(cores) > cores:
            raise ValueError(
                f"workers ({self.workers}) x threads_per_worker ({self.per_worker(cores)}) "
                f"= {self.workers * self.per_worker(cores)} exceeds the {cores} CPU cores of "
                "this machine; lower one of them"
            )
        return self


class IngestSettings(_Section):
    """Ingest: which exams are usable."""

    min_b_values: int = Field(
        2, ge=2, le=20, description="Fewest distinct acquired b-values (s/mm²) a DWI needs."
    )


class SegmentationSettings(_Section):
    """Which segmentation model runs, and where."""

    model: str = Field(
        "auto",
        description="'auto' (demo model on the demo cohort, 'taps' on real exams), 'demo', "
        "'taps', or the path of a trained nnU-Net v2 model folder.",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    folds: tuple[int | Literal["all"], ...] = Field(
        ("all",),
        description="nnU-Net folds to ensemble; 'all': every fold_<k> folder of the model "
        "(as nnUNetv2_predict does by default).",
    )
    checkpoint: str = Field(
        "checkpoint_final.pth", description="checkpoint file in each fold (or checkpoint_best.pth)"
    )
    adc_unit: Literal["auto", "mm2/s", "1e-3 mm2/s", "1e-6 mm2/s"] = Field(
        "auto",
        description="ADC unit the nnU-Net model was trained on (PI-CAI: 1e-6 mm2/s); 'auto' "
        "reads it from the model's plans (its training ADC's median).",
    )
    use_mirroring: bool = False
    tile_step_size: float = Field(0.5, gt=0.0, le=1.0)
    channel_map: dict[str, str] = Field(
        default_factory=dict,
        description="nnU-Net channel name -> our image role (t2w, dwi_b1000, adc).",
    )
    dask_resources: dict[str, float] = Field(
        default_factory=dict,
        description="On a Dask cluster, the worker resources segmentation needs, e.g. "
        "{GPU = 1}: it then runs only on workers started with them (dask worker ... "
        "--resources GPU=1) while the rest of each patient runs on any worker.",
    )


class MeasureSettings(_Section):
    """Volume and radiomics."""

    radiomics_file: str | None = Field(
        None,
        description="pyradiomics parameter file (YAML) with one section per image type; "
        "default: the documented tasks/radiomics.yaml shipped with the package.",
    )

    @field_validator("radiomics_file")
    @classmethod
    def _file_exists(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).expanduser().is_file():
            raise ValueError(f"file {value} does not exist")
        return None if value is None else str(Path(value).expanduser().resolve())


class DemoSettings(_Section):
    """The built-in synthetic demo cohort."""

    patients: int = Field(4, ge=1, le=2000)
    seed: int = Field(0, ge=0)


class StepSettings(_Section):
    """Per-step parameters, each the parameter model the step itself defines."""

    ingest: IngestSettings = IngestSettings()
    dwi_fit: DwiFitParams = DwiFitParams()
    t2_denoise: T2DenoiseParams = T2DenoiseParams()
    susan: SusanParams = SusanParams()
    n4: N4Params = N4Params()
    registration: RegistrationParams = RegistrationParams()


class Settings(BaseSettings):
    """Everything the platform can be configured with. Paths are resolved to absolute."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        validate_default=True,
    )

    data_root: Path | None = Field(None, description="Cohort root folder (DICOM/NIfTI/MHA).")
    output_root: Path = Field(Path("output"), description="Where every output is written.")
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL: sqlite:///FILE or postgresql://USER@HOST/DB. "
        f"Default: SQLite file {DATABASE_FILE_NAME} under output_root.",
    )
    pseudonym_key: SecretStr | None = Field(
        None,
        description="Secret key of the pseudonymous ids. Default: a random key kept in "
        f"output_root/{KEY_FILE_NAME} (created on first use). Never commit it.",
    )
    threads: ThreadSettings = ThreadSettings()
    steps: StepSettings = StepSettings()
    segmentation: SegmentationSettings = SegmentationSettings()
    measure: MeasureSettings = MeasureSettings()
    demo: DemoSettings = DemoSettings()
    qc: QcThresholds = QcThresholds()
    """Where a QC metric asks for a review or fails the exam (``tasks.qc_flags``)."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _config_file.get()
        if path is not None:
            if path.suffix.lower() == ".toml":
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
            else:
                sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)

    @field_validator("data_root")
    @classmethod
    def _data_root_exists(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        value = value.expanduser().resolve()
        if not value.is_dir():
            raise ValueError(f"folder {value} does not exist or is not a folder")
        return value

    @field_validator("output_root")
    @classmethod
    def _output_root_writable(cls, value: Path) -> Path:
        value = value.expanduser().resolve()
        if value.exists() and not value.is_dir():
            raise ValueError(f"{value} exists and is not a folder")
        existing = next(p for p in (value, *value.parents) if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise ValueError(f"cannot create or write {value}: {existing} is not writable")
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url_supported(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            url = make_url(value)
        except ArgumentError:
            raise ValueError(
                "not a database URL; expected e.g. sqlite:////abs/path/provenance.sqlite or "
                "postgresql://user@127.0.0.1:5432/cohort"
            ) from None
        if url.get_backend_name() not in SUPPORTED_DATABASES:
            raise ValueError(
                f"database '{url.get_backend_name()}' is not supported; use one of "
                f"{', '.join(SUPPORTED_DATABASES)}"
            )
        if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
            raise ValueError(
                "a SQLite URL needs a file (an in-memory database is lost at exit); "
                "expected e.g. sqlite:////abs/path/provenance.sqlite"
            )
        return value

    @property
    def resolved_database_url(self) -> str:
        """The database URL, defaulting to a SQLite file under ``output_root``."""
        return self.database_url or f"sqlite:///{self.output_root / DATABASE_FILE_NAME}"

    def public_dict(self) -> dict[str, Any]:
        """Settings as JSON types for provenance and display: secrets and passwords hidden."""
        data = self.model_dump(mode="json")
        data["pseudonym_key"] = "***" if self.pseudonym_key else None
        data["database_url"] = make_url(self.resolved_database_url).render_as_string(
            hide_password=True
        )
        return data


def demo_overrides(output_root: str | Path | None) -> dict[str, str]:
    """The demo's own output tree and database, whatever the cohort's settings say:
    ``output_root`` (default :data:`DEMO_OUTPUT_ROOT`) and the SQLite file in it."""
    root = Path(output_root or DEMO_OUTPUT_ROOT).expanduser()
    return {
        "output_root": str(root),
        "database_url": f"sqlite:///{root.resolve() / DATABASE_FILE_NAME}",
    }


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build the settings from overrides, environment, a config file and defaults.

    Parameters
    ----------
    config_file
        TOML (``.toml``) or YAML (``.yaml``/``.yml``) file; default ``$PROSTATE_COHORT_CONFIG``.
    **overrides
        Top-level settings given explicitly (e.g. by the command line); ``None`` is ignored.

    Raises
    ------
    SettingsError
        Naming every invalid setting and what is wrong with it.
    """
    path = config_file or os.environ.get(CONFIG_ENV)
    path = Path(path).expanduser().resolve() if path else None
    if path is not None:
        if not path.is_file():
            raise SettingsError(f"config file {path} does not exist")
        if path.suffix.lower() not in (".toml", ".yaml", ".yml"):
            raise SettingsError(f"config file {path} must end in .toml, .yaml or .yml")
    _refuse_unknown_sections()
    token = _config_file.set(path)
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as error:
        raise SettingsError(_describe(error, path)) from None
    except (ValueError, OSError) as error:  # unreadable or malformed config file
        raise SettingsError(f"config file {path}: {error}") from None
    finally:
        _config_file.reset(token)


def _refuse_unknown_sections() -> None:
    """Refuse nested environment variables under an unknown top-level name.

    pydantic-settings reads only the variables that match a field, so a typo in the first
    part (``PROSTATE_COHORT_STEP__N4__ITERATIONS``) would be dropped without a word; typos
    further down reach the (``extra="forbid"``) models and fail there. Plain names
    (``PROSTATE_COHORT_CONFIG``, or variables of the deployment scripts) are left alone.
    """
    unknown = []
    for name in sorted(os.environ):
        head, nested, _rest = name[len(ENV_PREFIX) :].partition("__")
        if (
            name.upper().startswith(ENV_PREFIX)
            and nested
            and head.lower() not in Settings.model_fields
        ):
            unknown.append(f"  {head.lower()}: unknown setting (environment variable {name})")
    if unknown:
        raise SettingsError("\n".join(["invalid settings:", *unknown]))


def _describe(error: ValidationError, path: Path | None) -> str:
    lines = ["invalid settings" + (f" (config file {path})" if path else "") + ":"]
    for item in error.errors():
        name = ".".join(str(part) for part in item["loc"]) or "(settings)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown setting"
        env = ENV_PREFIX + "__".join(str(part) for part in item["loc"]).upper()
        lines.append(f"  {name}: {message} (environment variable {env})")
    return "\n".join(lines)


def pseudonym_key(settings: Settings) -> str:
    """The pseudonymisation key: from the settings, else the key file under ``output_root``.

    A new random key file (mode 0600) is created on first use so that ids stay stable across
    runs over the same output tree. Back it up: without it, ids cannot be reproduced.
    """
    if settings.pseudonym_key is not None:
        value = settings.pseudonym_key.get_secret_value()
        if not value:
            raise SettingsError("pseudonym_key: must not be empty")
        return value
    key_file = settings.output_root / KEY_FILE_NAME
    if not key_file.exists():
        key_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = key_file.with_name(f"{KEY_FILE_NAME}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
        try:  # link is atomic and fails if another process made the key first: keep theirs
            os.link(tmp, key_file)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    key = key_file.read_text().strip()
    if not key:
        raise SettingsError(f"pseudonym key file {key_file} is empty")
    return key
