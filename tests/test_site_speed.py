"""What keeps a deployed round cheap, without changing what a round does.

Flower 1.41 starts a new ClientApp process per message, so what a round needs must be
quick to get in a fresh process: the encoded table comes from the site's state-dir
(keyed by the file's bytes), a training round does not import the validation suite,
and torch runs with the site's thread count.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from fedsynth.client import site as site_module
from fedsynth.client.site import ENCODED_PREFIX, load_encoded
from fedsynth.common.study import SiteConfig
from fedsynth.common.table import TableCheckError
from fedsynth.common.threads import ENV_VAR, NODE_KEY, site_threads, torch_threads


def test_encoded_table_is_kept_in_state_dir_by_file_hash(tmp_path, heart_schema,
                                                        heart_schema_path, heart_files,
                                                        monkeypatch):
    data = tmp_path / "site.csv"
    shutil.copy(heart_files["cleveland"], data)
    site = SiteConfig("cleveland", str(data), str(heart_schema_path),
                      state_dir=str(tmp_path / "state"))
    site_module._TABLES.clear()
    first = load_encoded(site, heart_schema)
    cached = list((tmp_path / "state").glob(f"{ENCODED_PREFIX}*.npy"))
    assert len(cached) == 1 and cached[0].stat().st_mode & 0o077 == 0  # owner-only

    # a new process (empty memory) reads the array, never the table
    site_module._TABLES.clear()
    monkeypatch.setattr(site_module, "read_table", lambda *a: pytest.fail("table re-read"))
    again = load_encoded(site, heart_schema)
    np.testing.assert_array_equal(first, again)
    monkeypatch.undo()

    # a changed file is a new key: checked and encoded again, the stale copy removed
    data.write_text("".join(heart_files["cleveland"].read_text().splitlines(True)[:50]))
    site_module._TABLES.clear()
    changed = load_encoded(site, heart_schema)
    assert changed.shape[0] == 50
    now = list((tmp_path / "state").glob(f"{ENCODED_PREFIX}*.npy"))
    assert len(now) == 1 and now != cached

    # a broken file is refused every time, and nothing is cached for it
    data.write_text(data.read_text().replace("63.0", "630.0", 1))
    site_module._TABLES.clear()
    with pytest.raises(TableCheckError):
        load_encoded(site, heart_schema)
    assert list((tmp_path / "state").glob(f"{ENCODED_PREFIX}*.npy")) == now


def test_a_training_round_does_not_import_the_validation_suite():
    code = ("import sys, fedsynth.client.app; "
            "print(any(m.startswith('fedsynth.common.validation') for m in sys.modules), "
            "'sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.stdout.split() == ["False", "False"]


def test_site_threads_setting(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert site_threads({}) == 1
    monkeypatch.setenv(ENV_VAR, "1")
    assert site_threads({}) == 1
    assert site_threads({NODE_KEY: 10_000}) == len(os.sched_getaffinity(0))  # capped
    for bad in (0, -2, "two", 1.5):
        with pytest.raises(ValueError, match=NODE_KEY):
            site_threads({NODE_KEY: bad})
    monkeypatch.setenv(ENV_VAR, "lots")
    with pytest.raises(ValueError, match=ENV_VAR):
        site_threads({})
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
