from kdcli.cli import entry

entry()
