"""Command lines: every argparse parser and main() of hsc-fast (launch/ scripts and console scripts call these)."""
