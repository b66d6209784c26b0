def test_demo_runs_the_host_loop(cli, tmp_path):
    result = cli("demo", "--workdir", tmp_path / "demo", "--fixtures", tmp_path / "none")
    assert result.exit_code == 0, result.output
    assert "[6/6] verified digits-1.edgebundle" in result.stdout
    assert (tmp_path / "demo" / "digits-1.edgebundle").exists()
    assert (tmp_path / "demo" / "keys" / "edgekit.pub").exists()
