"""`tidal doctor`: every section is present, the chosen directory is probed, and run() returns 0."""

from __future__ import annotations

from tidal.launch import doctor

MIB = 1 << 20
SECTIONS = ("torch", "gpus", "host", "disk", "mpi", "ray", "deepspeed")


def _labels(text: str) -> list[str]:
    return [line.split()[0] for line in text.splitlines() if not line.startswith(" ")]


def test_report_has_every_section_and_the_directory(tmp_path) -> None:
    text = doctor.report(str(tmp_path), size_bytes=2 * MIB)
    assert _labels(text) == list(SECTIONS)
    assert str(tmp_path) in text
    assert "write " in text and " read " in text
    assert len(text.splitlines()) <= 30
    assert list(tmp_path.iterdir()) == []


def test_report_names_a_bad_directory_instead_of_failing(tmp_path) -> None:
    missing = tmp_path / "absent"
    text = doctor.report(str(missing), size_bytes=MIB)
    disk_line = next(line for line in text.splitlines() if line.startswith("disk"))
    assert str(missing) in disk_line and "does not exist" in disk_line
    assert _labels(text) == list(SECTIONS)


def test_report_says_why_there_are_no_gpus(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(doctor, "probe_gpus", lambda: doctor.GpuProbe((), "NVML unavailable: stub reason"))
    text = doctor.report(str(tmp_path), size_bytes=MIB)
    assert "gpus       none (NVML unavailable: stub reason)" in text.splitlines()


def test_mpiexec_version_picks_the_version_line(tmp_path) -> None:
    fake = tmp_path / "mpiexec"
    fake.write_text("#!/bin/sh\necho 'HYDRA build details:'\necho '    Version:     5.0.2'\n")
    fake.chmod(0o755)
    assert doctor._mpiexec_version(str(fake)) == "Version: 5.0.2"


def test_package_text_for_missing_and_present_packages() -> None:
    assert doctor._package_text("tidal_no_such_package") == "not installed"
    assert doctor._package_text("psutil")[0].isdigit()


def test_run_prints_the_report_and_returns_zero(tmp_path, capsys) -> None:
    assert doctor.run(str(tmp_path), size_bytes=MIB) == 0
    printed = capsys.readouterr().out
    assert _labels(printed) == list(SECTIONS)
    assert str(tmp_path) in printed
