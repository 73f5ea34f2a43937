"""Operations (issue 12): logs, metrics, admin API and page, capture mode, CLI."""
