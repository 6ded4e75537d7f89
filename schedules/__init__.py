
from schedules import shiftadd  # noqa: E402,F401  registers the shift-add schedule rules
