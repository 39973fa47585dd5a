"""stageinteractor.process_memory against hand-written /proc status text."""
from stageinteractor.process_memory import RESULT_PREFIX, rss_bytes, status_kib


def test_status_kib_reads_the_named_field_only(tmp_path):
    f = tmp_path / "status"
    f.write_text("Name:\tpython\nVmHWM:\t  123456 kB\nVmRSS:\t   2048 kB\nVmRSSX:\t 7 kB\n")
    assert status_kib("VmHWM", str(f)) == 123456
    assert status_kib("VmRSS", str(f)) == 2048
    assert status_kib("VmSwap", str(f)) is None
    assert status_kib("VmHWM", str(tmp_path / "absent")) is None


def test_rss_bytes_and_prefix():
    assert rss_bytes(3) == 3 * 1024  # Linux: ru_maxrss in kilobytes
    assert RESULT_PREFIX == "MEMORY_RESULT "
