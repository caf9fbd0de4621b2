"""Energy and emissions of a training run, logged with its metrics (codecarbon's offline tracker).

    tracker = EnergyTracker("USA", enabled=is_main, processes=world_size)
    tracker.start()              # hardware probe in a background thread: training does not wait for it
    tracker.figures()            # {"energy_kwh", "kg_co2e", "energy_method"} so far, for a metrics.jsonl row
    tracker.stop()               # the run summary's "energy" entry

Measured where the hardware reports it, estimated otherwise; codecarbon 3.3 decides per device and
the method is stated in every row and the summary:
- CPU: Intel/AMD RAPL energy counters (/sys/class/powercap) when readable: measured. Otherwise
  estimated in codecarbon's "cpu_load" mode: the CPU's TDP from codecarbon's table of CPU models
  (an unknown model: 4 W per thread) times the CPU load (this process's CPU time over wall time and
  cores; under torchrun the machine's load), never below 10% of TDP in machine mode.
- GPU: NVML's energy counters (NVIDIA): measured.
- RAM: always estimated by codecarbon (watts per DIMM from the memory size).
- CO2e: kWh times the grid carbon intensity of `train.carbon_region` from codecarbon's offline
  data (Our World in Data's energy mix per country; per state for the USA, per province for Canada).

Figures count over resumes (the checkpoint keeps what earlier sessions used). The hardware probe
takes a few seconds in a fresh process (codecarbon reads cpuinfo); what the run uses before it is
done is not counted, and the summary says for how many seconds the tracker ran.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from lmforge.errors import LMForgeError

DEFAULT_REGION = "USA"
REGION_HELP = ("grid whose carbon intensity turns the run's kWh into kg CO2e: a 3-letter ISO 3166-1 country code "
               "(codecarbon's offline data, e.g. USA, FRA, GBR, DEU, IND, CHN), or COUNTRY/REGION for a US state "
               "or Canadian province (USA/california, CAN/quebec)")


def parse_region(code: str) -> tuple[str, str | None]:
    """(country ISO code, region or None) of a train.carbon_region value, checked against
    codecarbon's offline data."""
    from codecarbon.input import DataSource

    country, _, region = code.strip().partition("/")
    country = country.upper()
    countries = DataSource().get_global_energy_mix_data()
    if country not in countries:
        raise LMForgeError(f"train.carbon_region '{code}': '{country}' is not a country codecarbon has grid data "
                           f"for; use a 3-letter ISO 3166-1 code such as USA, FRA, GBR, DEU, IND or CHN")
    if not region:
        return country, None
    region = region.strip().lower()
    try:
        regions = [r for r in DataSource().get_country_emissions_data(country.lower()) if not r.startswith("_")]
    except Exception:  # codecarbon has regional data for a few countries only (a file per country)
        regions = []
    if region not in regions:
        known = f"its regions: {', '.join(regions[:8])}, ..." if regions else "codecarbon has no regional data for it"
        raise LMForgeError(f"train.carbon_region '{code}': '{region}' is not a region of {country} ({known})")
    return country, region


class EnergyTracker:
    """kWh and kg CO2e of this run on this machine (the main process tracks; the others do nothing)."""

    def __init__(self, region: str, enabled: bool = True, processes: int = 1):
        self.country, self.region = parse_region(region)
        self.enabled = enabled
        self.processes = processes
        self.before_kwh = self.before_kg = 0.0  # what earlier sessions of a resumed run used
        self.error: str | None = None
        self._tracker: Any = None
        self._last: Any = None  # codecarbon's EmissionsData of the last flush
        self._summary: dict[str, Any] | None = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._started_at = self._ready_at = 0.0

    def restore(self, saved: dict[str, Any] | None) -> None:
        """Continue from a checkpoint's `state()`."""
        if saved:
            self.before_kwh = float(saved.get("kwh") or 0.0)
            self.before_kg = float(saved.get("kg_co2e") or 0.0)

    def start(self) -> None:
        if not self.enabled:
            return
        self._started_at = time.perf_counter()
        self._thread = threading.Thread(target=self._start_tracker, name="lmforge-energy", daemon=True)
        self._thread.start()

    def _start_tracker(self) -> None:
        try:
            from codecarbon import OfflineEmissionsTracker
            from codecarbon.output_methods.base_output import BaseOutput

            keeper = self

            class _Keep(BaseOutput):  # codecarbon hands every flush's totals to its output handlers
                def out(self, total: Any, delta: Any) -> None:
                    keeper._last = total

                def live_out(self, total: Any, delta: Any) -> None:
                    pass

            logging.getLogger("codecarbon").setLevel(logging.ERROR)
            self._tracker = OfflineEmissionsTracker(
                country_iso_code=self.country, region=self.region, output_methods=[], output_handlers=[_Keep()],
                tracking_mode="process" if self.processes == 1 else "machine", log_level="error",
                allow_multiple_runs=True, project_name="lmforge")
            self._tracker.start()
        except Exception as e:  # no figures rather than no training run
            self.error = f"{type(e).__name__}: {e}"
            self._tracker = None
        self._ready_at = time.perf_counter()
        self._ready.set()

    def _flush(self) -> Any:
        """codecarbon's totals now (None while the hardware probe runs, or without a tracker)."""
        if not self._ready.is_set() or self._tracker is None:
            return None
        self._tracker.flush()
        return self._last

    def _method(self, data: Any) -> str:
        """'measured' when codecarbon reads every compute device's energy counters (RAPL for the CPU,
        NVML for GPUs), 'partly measured' when only the GPUs', else 'estimated' (RAM is always estimated)."""
        from codecarbon.core.cpu import is_rapl_available

        if is_rapl_available():
            return "measured"
        return "partly measured" if int(data.gpu_count or 0) else "estimated"

    def figures(self) -> dict[str, Any]:
        """The row fields: energy_kwh and kg_co2e since the run began (None until the tracker is ready)."""
        if not self.enabled or self._summary is not None:
            return {}
        data = self._flush()
        if data is None:
            return {"energy_kwh": None, "kg_co2e": None, "energy_method": "pending" if self.error is None else
                    "unavailable"}
        return {"energy_kwh": round(self.before_kwh + data.energy_consumed, 9),
                "kg_co2e": round(self.before_kg + data.emissions, 9), "energy_method": self._method(data)}

    def state(self) -> dict[str, Any] | None:
        """What a checkpoint keeps: the figures so far and how they were obtained (a resumed run counts
        on from kwh and kg_co2e; the report reads the rest)."""
        if not self.enabled:
            return None
        data = self._flush()
        if data is None:
            return {"kwh": self.before_kwh, "kg_co2e": self.before_kg, "method": "pending", "error": self.error}
        return self._entry(data)

    def stop(self) -> dict[str, Any] | None:
        """The summary entry (None on the processes that do not track); stops codecarbon's threads.
        Calling it again gives the same entry."""
        if not self.enabled or self._thread is None:
            return None
        if self._summary is None:
            self._ready.wait()
            if self._tracker is None:
                self._summary = {"kwh": None, "kg_co2e": None, "method": "unavailable", "error": self.error}
            else:
                self._tracker.stop()
                self._summary = self._entry(self._last)
        return self._summary

    def _entry(self, data: Any) -> dict[str, Any]:
        """The figures of codecarbon's totals `data` plus earlier sessions', with their methods."""
        from codecarbon.core.cpu import is_rapl_available

        rapl = is_rapl_available()
        gpus = int(data.gpu_count or 0)
        intensity = data.emissions / data.energy_consumed * 1000 if data.energy_consumed > 0 else None
        return {
            "kwh": round(self.before_kwh + data.energy_consumed, 9),
            "kg_co2e": round(self.before_kg + data.emissions, 9),
            "method": self._method(data),
            "session_components_kwh": {"cpu": round(data.cpu_energy, 9), "gpu": round(data.gpu_energy, 9),
                                       "ram": round(data.ram_energy, 9)},
            "component_methods": {
                "cpu": "measured: RAPL energy counters" if rapl else
                       f"estimated: codecarbon cpu_load ({data.cpu_model}: TDP from codecarbon's CPU table, else "
                       f"4 W per thread, x {'this process' if self.processes == 1 else 'the machine'}'s CPU load)",
                "gpu": f"measured: NVML energy counters ({data.gpu_model})" if gpus else "no GPU",
                "ram": "estimated: codecarbon (watts per DIMM from the memory size)"},
            "region": self.country + (f"/{self.region}" if self.region else ""),
            "carbon_intensity_g_per_kwh": round(intensity, 3) if intensity is not None else None,
            "session_tracked_seconds": round(float(data.duration), 2),
            "probe_seconds": round(self._ready_at - self._started_at, 2),
            "tool": f"codecarbon {data.codecarbon_version} (offline)",
        }
