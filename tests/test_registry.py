import pytest

from kdcli.core.errors import KdError
from kdcli.core.registry import MODELS, Registry, import_user_modules
from kdcli.models import build_model, count_params


def test_register_build_list_and_errors():
    reg = Registry("widget")

    @reg.register("square")
    def square(x, *, times: int = 2):
        """Multiply by `times`."""
        return x * times

    assert reg.names() == ["square"]
    assert reg.build("square", 3, times=4) == 12
    assert reg.params("square") == {"times": 2}
    assert reg.summary("square") == "Multiply by `times`."
    with pytest.raises(KdError, match=r"Unknown widget 'sqare'\. Did you mean 'square'\? Available: square"):
        reg.get("sqare")
    with pytest.raises(KdError, match="widget 'square' has no parameter tims. Its parameters: times"):
        reg.build("square", 3, tims=4)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("square")(lambda x: x)


def test_user_model_from_a_python_file(tmp_path):
    f = tmp_path / "my_models.py"
    f.write_text(
        "import torch.nn as nn\n"
        "from kdcli.registry import MODELS\n"
        "@MODELS.register('tiny_linear_test')\n"
        "def tiny(input_shape, num_classes, *, bias: bool = True):\n"
        "    size = input_shape[0] * input_shape[1] * input_shape[2]\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(size, num_classes, bias=bias))\n"
    )
    import_user_modules([str(f)])
    assert "tiny_linear_test" in MODELS.names()
    model = build_model("tiny_linear_test", (1, 4, 4), 3, {"bias": False})
    assert count_params(model) == 16 * 3


def test_broken_user_module_is_named(tmp_path):
    f = tmp_path / "broken.py"
    f.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(KdError, match=r"could not import '.*broken.py': RuntimeError: boom"):
        import_user_modules([str(f)])
    with pytest.raises(KdError, match="could not import 'no_such_module_xyz'"):
        import_user_modules(["no_such_module_xyz"])


def test_types_and_required_parameters_are_checked():
    reg = Registry("widget")

    @reg.register("box")
    def box(*, width: int, sizes: list = (1,), scale: float = 1.0):
        return width * scale

    with pytest.raises(KdError, match="widget 'box' needs a value for 'width'"):
        reg.build("box", width="???")
    with pytest.raises(KdError, match="widget 'box': 'sizes' takes list values; got 3"):
        reg.build("box", width=1, sizes=3)
    assert reg.build("box", width=2, scale=3) == 6  # an int is a fine float


def test_two_user_files_with_the_same_name_both_register(tmp_path):
    for folder, model in (("a", "same_stem_a"), ("b", "same_stem_b")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "models.py").write_text(
            "from kdcli.registry import MODELS\n"
            f"@MODELS.register('{model}')\n"
            "def build(input_shape, num_classes):\n"
            "    return None\n"
        )
    import_user_modules([str(tmp_path / "a" / "models.py"), str(tmp_path / "b" / "models.py")])
    assert {"same_stem_a", "same_stem_b"} <= set(MODELS.names())
