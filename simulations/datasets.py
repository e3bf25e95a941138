"""Datasets a simulated study can run on, split into sites as they really are.

The bundled demo is the UCI Heart Disease data of four hospitals (CC BY 4.0, see
``data/heart_disease/ATTRIBUTION.md``): a natural federation whose sites differ in case
mix, disease rate and which measurements they took. TCGA-BRCA (FLamby's six regions,
``data/tcga_brca/ATTRIBUTION.md``) adds a survival outcome.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from ..common.bundled import (  # noqa: F401 (re-exported: the simulation's own names)
    DATA_DIR,
    DATASETS,
    HEART_SITES,
    TCGA_REGIONS,
    bundled_schema,
    bundled_schema_path,
    bundled_site_files,
    bundled_sites,
)
from ..common.schema import Schema
from ..common.study import ConfigError
from ..common.table import conform, read_table

# AMLSG: centres with at least 30 patients are sites, the rest are pooled as one more.
AMLSG_MIN_CENTRE = 30
MIMIC_SITES = 3  # one hospital in reality: sites are made by a Dirichlet split


def shared_data_dir() -> Path:
    """Real data that fedsynth may use but not ship (AMLSG is GPL-3): ../shared/data."""
    env = os.environ.get("FEDSYNTH_SHARED_DATA")
    candidates = [Path(env)] if env else []
    candidates += [Path.cwd().parent / "shared" / "data",
                   Path(__file__).resolve().parents[1].parent / "shared" / "data"]
    for c in candidates:
        if c.is_dir():
            return c
    raise ConfigError(
        "this dataset is not shipped with fedsynth; set FEDSYNTH_SHARED_DATA to the folder "
        "that holds amlsg/"
    )


def load_site_frames(name: str) -> tuple[Schema, dict[str, pd.DataFrame]]:
    """Typed rows of each site of a bundled dataset, checked against its schema."""
    schema = bundled_schema(name)
    if name == "tcga_brca":
        return schema, _tcga_brca_sites(schema)
    if name == "amlsg":
        return schema, _amlsg_sites(schema)
    if name == "mimic3_demo":
        from .splits import dirichlet_split

        frame = mimic_patients(schema)
        labels = frame["gender"].astype(str).to_numpy()
        return schema, dirichlet_split(frame, labels, MIMIC_SITES, alpha=1.0, seed=0)
    return schema, {site: read_table(p, schema) for site, p in bundled_site_files(name).items()}


def _tcga_brca_sites(schema: Schema) -> dict[str, pd.DataFrame]:
    """FLamby's six regions; the patient identifier is dropped before anything else."""
    folder = DATA_DIR / "tcga_brca"
    rows = pd.read_csv(folder / "brca.csv")
    split = pd.read_csv(folder / "train_test_split.csv")
    centre = split.set_index("pid")["fold2"].str.split("_").str[1].astype(int)
    rows = rows[rows["pid"].isin(centre.index)]
    sites = {}
    for idx, region in TCGA_REGIONS.items():
        part = rows[rows["pid"].map(centre) == idx].drop(columns="pid")
        sites[region] = conform(part.reset_index(drop=True), schema)
    return sites


def _amlsg_sites(schema: Schema) -> dict[str, pd.DataFrame]:
    """AMLSG clinical table joined to the patient x gene matrix, split by centre."""
    folder = shared_data_dir() / "amlsg"
    clin = pd.read_csv(folder / "amlsg_clinical.csv")
    gen = pd.read_csv(folder / "amlsg_genetic.tsv", sep="\t")
    genes = [c[len("mut_"):] for c in schema.codesets["mut"]]
    hits = gen[gen["GENE"].isin(genes)].assign(v=1)
    matrix = hits.pivot_table(index="SAMPLE_NAME", columns="GENE", values="v", aggfunc="max")
    matrix = matrix.reindex(index=clin["PDID"], columns=genes).fillna(0).astype(int)
    frame = pd.DataFrame(
        {
            "age": clin["AOD"],
            "sex": clin["gender"],
            "wbc": clin["wbc"],
            "hb": clin["HB"],
            "platelet": clin["platelet"].round(),
            "ldh": clin["LDH"].round(),
            "bm_blasts": clin["BM_Blasts"].round(),
            "pb_blasts": clin["PB_Blasts"].round(),
            "ecog": clin["Performance_ECOG"],
            "aml_type": clin["TypeAML"],
            "cyto_risk": clin["C_Risk"],
            "complex_karyotype": clin["complex"],
            "OS": clin["OS"],
            "death": clin["Status"],
        }
    )
    for gene in genes:
        frame[f"mut_{gene}"] = matrix[gene].to_numpy()
    counts = clin["Center"].value_counts()
    big = sorted(int(c) for c in counts[counts >= AMLSG_MIN_CENTRE].index)
    sites = {}
    for centre in big:
        part = frame[(clin["Center"] == centre).to_numpy()]
        sites[f"centre_{centre}"] = conform(part.reset_index(drop=True), schema)
    rest = frame[~clin["Center"].isin(big).to_numpy()]
    sites["other_centres"] = conform(rest.reset_index(drop=True), schema)
    return sites


def mimic_patients(schema: Schema) -> pd.DataFrame:
    """One row per MIMIC-III demo patient: demographics, survival, diagnosis categories."""
    folder = shared_data_dir() / "mimic3_demo"
    pat = pd.read_csv(folder / "PATIENTS.csv", parse_dates=["dob", "dod"])
    adm = pd.read_csv(folder / "ADMISSIONS.csv", parse_dates=["admittime", "dischtime"])
    dx = pd.read_csv(folder / "DIAGNOSES_ICD.csv", dtype={"icd9_code": str})
    first = adm.groupby("subject_id")["admittime"].min()
    last = adm.groupby("subject_id")["dischtime"].max()
    n_adm = adm.groupby("subject_id").size()
    pat = pat.set_index("subject_id")
    # MIMIC shifts the birth dates of patients over 89 so that they appear ~300 years old
    # (whole years from the calendar: the shifted dates overflow a nanosecond timedelta)
    age = (first.dt.year - pat["dob"].dt.year).clip(upper=90).astype(int)
    end = pat["dod"].where(pat["dod"].notna(), last)
    days = (end - first).dt.days.clip(lower=0)
    frame = pd.DataFrame(
        {
            "gender": pat["gender"],
            "age": age,
            "admissions": n_adm,
            "survival_days": days,
            "died": pat["expire_flag"],
        }
    )
    codes = [c[len("dx_"):] for c in schema.codesets["dx"]]
    dx = dx.dropna(subset=["icd9_code"])
    dx["cat"] = [c[:4] if c.startswith("E") else c[:3] for c in dx["icd9_code"]]
    matrix = (
        dx.assign(v=1)
        .pivot_table(index="subject_id", columns="cat", values="v", aggfunc="max")
        .reindex(index=frame.index, columns=codes)
        .fillna(0)
        .astype(int)
    )
    frame = pd.concat([frame, matrix.add_prefix("dx_")], axis=1)
    return conform(frame.reset_index(drop=True), schema)
