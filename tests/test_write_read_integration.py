"""Every write task, sent by name to a real prefork worker, read back inside its children."""

from __future__ import annotations

from tests.conftest import Worker, fresh_id


def test_project_option_written_by_name_is_read_in_every_child(worker: Worker) -> None:
    """A set_project_option sent by name is what every prefork child then reads."""
    project = fresh_id()
    result = worker.call("options.set_project_option", project, "mail:subject_prefix", "[Prod]")
    assert result["scope"] == f"project:{project}"
    assert result["changed"] is True
    answers = worker.read_everywhere("project_options", "get_value", project, "mail:subject_prefix")
    assert len(answers) == 2
    assert set(map(str, answers.values())) == {"[Prod]"}
