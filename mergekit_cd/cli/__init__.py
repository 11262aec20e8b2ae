"""Command-line front ends. Each ``cd-*`` command parses arguments and calls one public API
function; user errors (:class:`~mergekit_cd.errors.MergeError`) print one line and exit 1."""
