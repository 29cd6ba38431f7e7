"""Click commands; rsseg.cli loads them lazily."""
