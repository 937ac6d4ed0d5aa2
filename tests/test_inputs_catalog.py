"""The catalog finds the mini benchmark's datasets without ``import alignednorm.mini`` first."""

import subprocess
import sys
import textwrap

from alignednorm.mini import generate_world


def _fresh_python(code: str) -> str:
    """Run ``code`` in a new interpreter (nothing imported yet) and return what it printed."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_load_splits_of_a_mini_dataset_in_a_fresh_process(tmp_path):
    generate_world(tmp_path, names=["mini_shapes"])
    out = _fresh_python(f"""
        import sys
        import alignednorm.data as D
        assert "alignednorm.mini" not in sys.modules
        splits = D.load_splits("mini_shapes", {str(tmp_path)!r})
        print(splits.num_classes, len(splits.train), "torch" in sys.modules)
    """)
    assert out.split() == ["24", str(24 * 20), "False"]  # and the mini world did not pull torch in


def test_lookups_that_need_the_mini_benchmark_find_it():
    out = _fresh_python("""
        import sys
        from alignednorm.data.catalog import get_dataset, get_suite, list_datasets, list_suites
        get_dataset("oxford_pets")
        print("alignednorm.mini" in sys.modules)  # a paper dataset: the mini package is not imported
        print(get_dataset("MINI_SHAPES").name, get_suite("mini").source, "mini" in list_suites())
        print(sum(name.startswith("mini_") for name in list_datasets()))
    """)
    assert out.split() == ["False", "mini_shapes", "mini_objects", "True", "11"]


def test_suites_and_names_in_a_fresh_process():
    out = _fresh_python("""
        from alignednorm.data.catalog import get_suite, list_datasets
        print(",".join(list_datasets("mini_dg")))
        print(get_suite("mini").base2new[0])
    """)
    assert out.split() == ["mini_objects_v2,mini_objects_sketch,mini_objects_a,mini_objects_r", "mini_objects"]


def test_unknown_name_still_suggests(tmp_path):
    out = _fresh_python("""
        from alignednorm.data.catalog import get_dataset
        try:
            get_dataset("mini_shape")
        except KeyError as exc:
            print(exc)
    """)
    assert "did you mean mini_shapes" in out
