"""Result objects of one model run: TID 1500 SR, SEG, KO and a Secondary Capture summary (IHE AIR)."""

from workers.results.build import ResultSet, build_results
from workers.results.context import ResultContext
from workers.results.uids import result_uid

__all__ = ["ResultContext", "ResultSet", "build_results", "result_uid"]
