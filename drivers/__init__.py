"""Hardware drivers. Each family imports only gateway's leaf modules (events, errors, driver)."""
