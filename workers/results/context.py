"""Who makes the results: the node's identity, as configured, that every result object carries."""

from __future__ import annotations

from dataclasses import dataclass

from workers.results.uids import check_uid_root

MAX_LO = 64  # DICOM LO (Manufacturer, Software Versions, Institution Name)


@dataclass(frozen=True)
class ResultContext:
    """The node's identity in result objects.

    ``manufacturer`` is how the node recognises its own results coming back from the PACS (beside
    the IHE "Processing Algorithm" equipment code), ``software_version`` the pacsnode version that
    encoded them and ``uid_root`` the root of every UID they get.
    """

    manufacturer: str
    software_version: str
    uid_root: str
    institution_name: str | None = None

    def __post_init__(self) -> None:
        # Checked here so a misconfigured node fails at startup, not at its first finished study.
        for name in ("manufacturer", "software_version"):
            value = getattr(self, name)
            if not value or len(value) > MAX_LO or "\\" in value:
                raise ValueError(f"{name} must be 1 to {MAX_LO} characters without a backslash, got {value!r}")
        if self.institution_name is not None and (
            not self.institution_name or len(self.institution_name) > MAX_LO or "\\" in self.institution_name
        ):
            raise ValueError(f"institution_name must be 1 to {MAX_LO} characters without a backslash")
        check_uid_root(self.uid_root)
