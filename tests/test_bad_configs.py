"""The bad-config corpus: each case fails `snakemake -n` with one clear line, before any job runs.

Each tests/bad_configs/NN-*.yaml is merged onto base.yaml (two --configfile
arguments, as a user would) and says in its `# expect:` header what the one
error line must contain: the config path at fault and, where there is one,
the fix.
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers import REPO, snakemake

pytestmark = pytest.mark.workflow  # each case is a real `snakemake -n`

CORPUS = REPO / "tests" / "bad_configs"
CASES = sorted(p.name for p in CORPUS.glob("[0-9][0-9]-*.yaml"))


def expected(case: str) -> str:
    first = (CORPUS / case).read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# expect: "), f"{case} needs an '# expect: ' header"
    return first[len("# expect: ") :]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, tuple[int, str]]:
    root = tmp_path_factory.mktemp("bad")

    def run(case: str):
        work = root / case.removesuffix(".yaml")
        shutil.copytree(CORPUS, work)
        proc = snakemake(
            work,
            "-n",
            "--cores",
            "1",
            "--configfile",
            str(work / "base.yaml"),
            str(work / case),
            check=False,
            timeout=120,
        )
        leftovers = (
            sorted(str(p.relative_to(work)) for p in (work / "results").rglob("*"))
            if (work / "results").exists()
            else []
        )
        return case, (proc.returncode, proc.stdout + proc.stderr, leftovers)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(run, CASES))


def test_base_config_is_valid(tmp_path):
    shutil.copytree(CORPUS, tmp_path / "w")
    snakemake(tmp_path / "w", "-n", "--cores", "1", "--configfile", str(tmp_path / "w" / "base.yaml"))


@pytest.mark.parametrize("case", CASES)
def test_bad_config_fails_with_one_clear_line(case, outcomes):
    returncode, output, leftovers = outcomes[case]
    assert returncode != 0, f"{case} was accepted:\n{output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("ftflow config error: ")]
    assert len(errors) == 1, output[-3000:]
    assert expected(case) in errors[0], f"{case}: {errors[0]!r}"
    assert not leftovers, f"{case} wrote files before failing: {leftovers}"
