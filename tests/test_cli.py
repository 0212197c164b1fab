import re

import pytest

from ma_convert.cli import main


def test_demo_runs_and_prints_routing_stats(capsys):
    assert main(["demo", "--layer-only", "--seq-len", "32", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert len(re.findall(r"RoutingStats\(E1=\d\.\d\d \| E2=\d\.\d\d \| E3=\d\.\d\d entropy=\d\.\d\d cost=\d\.\d\d\)", out)) == 3
    assert "hard routing" in out


def test_env_lists_versions(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^torch\s+\d+\.\d+", out, flags=re.M)
    assert "ma-convert" in out


def test_unknown_command_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["transmogrify"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_push_refuses_a_folder_without_a_card(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert main(["push", str(tmp_path), "me/model"]) == 2
    assert "README.md" in capsys.readouterr().err


def test_finetune_reports_recipe_errors(tmp_path, capsys):
    (tmp_path / "r.yaml").write_text("training:\n  stpes: 3\n")
    assert main(["finetune", "--config", str(tmp_path / "r.yaml")]) == 2
    assert "did you mean steps" in capsys.readouterr().err
