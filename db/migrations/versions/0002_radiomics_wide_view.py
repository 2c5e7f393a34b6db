"""View ``radiomics_wide``: radiomics one row per patient x image x mask, one column per feature.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02

For analysts who use SQL directly::

    SELECT patient, image, firstorder_mean, glcm_contrast
    FROM radiomics_wide WHERE image = 'adc' AND mask = 'demo:gland';

Columns: ``patient`` (pseudonymous id), ``image`` (``t2w``, ``adc``, ``b1000``), ``mask``
(``<model>:<zone>``, e.g. ``demo:gland``), ``settings_hash``, ``step_run_id`` and
``pipeline_run_id`` (the step run and pipeline run that extracted the values; join
``step_run`` for versions and parameters), then one column per feature named
``<feature_class>_<feature>`` in lower case (``firstorder_10percentile``,
``glcm_jointenergy``, ``shape_voxelvolume``; the rule of ``db.queries.wide_column``), in
alphabetical order. Values are in the image's units (ADC in mm²/s); NULL where the feature
is undefined or was not extracted for that image (``shape_*`` is extracted on T2 only).
Only the newest extraction of each patient x image x mask is shown (highest step run id),
so a forced recompute replaces the old row rather than adding one.

Why a view over a fixed feature list: a wide table needs its columns known when it is
created. The list below is the feature set of the shipped settings (``tasks/radiomics.yaml``
with pyradiomics 3.1; every image type's classes together), frozen here as a migration is.
Alternatives rejected: a view generated from the feature names present in the database
would change its columns whenever data changes, outside Alembic's control; a table
regenerated at the end of each run duplicates the data, needs DDL (and locks) at run time
and goes stale when a run fails before refreshing it. The view is always current, needs no
refresh and is plain SQL that SQLite and PostgreSQL both run (conditional aggregation,
``MAX(CASE ... END)``). Features outside the list (a custom settings file) stay in
``radiomics_feature`` and in ``prostate-cohort features --wide``, which pivots whatever is
stored. ``tests/db/test_queries.py`` fails when the shipped settings' feature set and this
list disagree: then add a migration that recreates the view with the new list.

SQLite caveat for later migrations: Alembic's batch mode rebuilds a table by copy, drop and
rename, and SQLite refuses the rename while a view names the dropped table ("error in view
radiomics_wide"). A migration that batch-alters ``radiomics_feature``, ``patient`` or
``step_run`` must drop this view first and create it again afterwards.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

VIEW = "radiomics_wide"

#: pyradiomics feature names per class, as the shipped settings extract them.
FEATURES: dict[str, str] = {
    "firstorder": (
        "10Percentile 90Percentile Energy Entropy InterquartileRange Kurtosis Maximum Mean "
        "MeanAbsoluteDeviation Median Minimum Range RobustMeanAbsoluteDeviation "
        "RootMeanSquared Skewness TotalEnergy Uniformity Variance"
    ),
    "glcm": (
        "Autocorrelation ClusterProminence ClusterShade ClusterTendency Contrast Correlation "
        "DifferenceAverage DifferenceEntropy DifferenceVariance Id Idm Idmn Idn Imc1 Imc2 "
        "InverseVariance JointAverage JointEnergy JointEntropy MCC MaximumProbability "
        "SumEntropy SumSquares"
    ),
    "gldm": (
        "DependenceEntropy DependenceNonUniformity DependenceNonUniformityNormalized "
        "DependenceVariance GrayLevelNonUniformity GrayLevelVariance HighGrayLevelEmphasis "
        "LargeDependenceEmphasis LargeDependenceHighGrayLevelEmphasis "
        "LargeDependenceLowGrayLevelEmphasis LowGrayLevelEmphasis SmallDependenceEmphasis "
        "SmallDependenceHighGrayLevelEmphasis SmallDependenceLowGrayLevelEmphasis"
    ),
    "glrlm": (
        "GrayLevelNonUniformity GrayLevelNonUniformityNormalized GrayLevelVariance "
        "HighGrayLevelRunEmphasis LongRunEmphasis LongRunHighGrayLevelEmphasis "
        "LongRunLowGrayLevelEmphasis LowGrayLevelRunEmphasis RunEntropy "
        "RunLengthNonUniformity RunLengthNonUniformityNormalized RunPercentage RunVariance "
        "ShortRunEmphasis ShortRunHighGrayLevelEmphasis ShortRunLowGrayLevelEmphasis"
    ),
    "glszm": (
        "GrayLevelNonUniformity GrayLevelNonUniformityNormalized GrayLevelVariance "
        "HighGrayLevelZoneEmphasis LargeAreaEmphasis LargeAreaHighGrayLevelEmphasis "
        "LargeAreaLowGrayLevelEmphasis LowGrayLevelZoneEmphasis SizeZoneNonUniformity "
        "SizeZoneNonUniformityNormalized SmallAreaEmphasis SmallAreaHighGrayLevelEmphasis "
        "SmallAreaLowGrayLevelEmphasis ZoneEntropy ZonePercentage ZoneVariance"
    ),
    "ngtdm": ("Busyness Coarseness Complexity Contrast Strength"),
    "shape": (
        "Elongation Flatness LeastAxisLength MajorAxisLength Maximum2DDiameterColumn "
        "Maximum2DDiameterRow Maximum2DDiameterSlice Maximum3DDiameter MeshVolume "
        "MinorAxisLength Sphericity SurfaceArea SurfaceVolumeRatio VoxelVolume"
    ),
}


def _feature_columns() -> list[tuple[str, str, str]]:
    """``(column, feature_class, feature)`` for every feature, sorted by column name."""
    columns = [
        (f"{cls}_{name}".lower(), cls, name)
        for cls, names in FEATURES.items()
        for name in names.split()
    ]
    return sorted(columns)


def view_sql() -> str:
    """The ``CREATE VIEW`` statement (the same on SQLite and PostgreSQL)."""
    values = ",\n".join(
        f"  MAX(CASE WHEN f.feature_class = '{cls}' AND f.feature = '{name}' "
        f"THEN f.value END) AS {column}"
        for column, cls, name in _feature_columns()
    )
    return f"""CREATE VIEW {VIEW} AS
SELECT
  p.pseudo_id AS patient, f.image AS image, f.mask AS mask,
  f.settings_hash AS settings_hash, f.step_run_id AS step_run_id,
  s.pipeline_run_id AS pipeline_run_id,
{values}
FROM radiomics_feature f
JOIN patient p ON p.id = f.patient_id
JOIN step_run s ON s.id = f.step_run_id
JOIN (
  SELECT patient_id, image, mask, MAX(step_run_id) AS step_run_id
  FROM radiomics_feature GROUP BY patient_id, image, mask
) newest ON newest.patient_id = f.patient_id AND newest.image = f.image
  AND newest.mask = f.mask AND newest.step_run_id = f.step_run_id
GROUP BY p.pseudo_id, f.image, f.mask, f.settings_hash, f.step_run_id, s.pipeline_run_id"""


def upgrade() -> None:
    op.execute(view_sql())


def downgrade() -> None:
    op.execute(f"DROP VIEW {VIEW}")
