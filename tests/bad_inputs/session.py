"""One dashboard session in a process of its own, clicking the sidebar's "Queue" button: the
two-sessions race of ``test_dashboard_cases.py`` starts two of these on one data root.

    python -m tests.bad_inputs.session READY GO CLICKS

The data root and the retraining switches come from the environment (``STADSBEELD_DATA``, ...).
The session renders the dashboard once (AppTest), touches ``READY``, waits for ``GO`` to exist,
then clicks the button ``CLICKS`` times and prints, as JSON, the ids of the jobs the session
queued (its ``jobs_queued_here``) and, per click, the sidebar's "Job not queued" warning or null.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from streamlit import config as st_config
from streamlit.testing.v1 import AppTest

from dashboard.retrain import MINE_KEY

APP = str(Path(__file__).resolve().parents[2] / "dashboard" / "app.py")


def main(ready: Path, go: Path, clicks: int) -> None:
    st_config.set_option("server.address", "127.0.0.1")  # loopback: no secret needed
    app = AppTest.from_file(APP, default_timeout=120).run()
    assert not app.exception, app.exception
    ready.touch()
    while not go.exists():
        time.sleep(0.005)
    refusals = []
    for _ in range(clicks):
        app.button(key="retrain_submit").click().run()
        assert not app.exception, app.exception
        notes = [w.value for w in app.sidebar.warning if w.value.startswith("Job not queued")]
        refusals.append(notes[0] if notes else None)
    print(json.dumps({"mine": sorted(app.session_state[MINE_KEY]), "refusals": refusals}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
