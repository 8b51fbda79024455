"""Print the qat.yaml key reference as a Markdown table (README.md embeds this output; a test keeps them equal)."""

from ultralytics_qat.config import describe_options


def reference_table() -> str:
    """The Markdown table of every qat.yaml key: key, default, allowed values and meaning."""
    lines = ["| key | default | allowed: meaning |", "|---|---|---|"]
    for key, default, doc in describe_options():
        shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else default
        lines.append(f"| `{key}` | `{shown}` | {doc.replace('|', '&#124;')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_table())
