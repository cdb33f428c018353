// Command ferretdb-embed runs FerretDB v1.24.2 for m365sync's development and test
// machines, on PostgreSQL (-postgresql-url, the indexed default of scripts/services.sh) or
// on SQLite (-sqlite-dir, the private servers of the fault tests).
//
// A `go install` of FerretDB's own command panics at start, because its version file is
// generated at build time and is not in the published module. Embedding the public
// `ferretdb` package from a module of our own skips that check (it only applies when the
// main module is FerretDB's), which is exactly what the package exists for.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/FerretDB/FerretDB/ferretdb"
)

func main() {
	listen := flag.String("listen-addr", "127.0.0.1:27017", "TCP address to accept MongoDB wire protocol connections on")
	dir := flag.String("sqlite-dir", "", "existing directory that holds one SQLite file per database")
	pgURL := flag.String("postgresql-url", "", "PostgreSQL database FerretDB keeps its collections in")
	level := flag.String("log-level", "warn", "debug, info, warn or error (info logs every connection)")
	flag.Parse()

	var logLevel slog.Level
	if err := logLevel.UnmarshalText([]byte(*level)); err != nil {
		fmt.Fprintln(os.Stderr, "ferretdb-embed:", err)
		os.Exit(2)
	}
	config := &ferretdb.Config{
		Listener: ferretdb.ListenerConfig{TCP: *listen},
		Logger:   slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: logLevel})),
	}
	where := ""
	switch {
	case (*dir == "") == (*pgURL == ""):
		fmt.Fprintln(os.Stderr, "ferretdb-embed: give exactly one of -sqlite-dir and -postgresql-url")
		os.Exit(2)
	case *pgURL != "":
		config.Handler = "postgresql"
		config.PostgreSQLURL = *pgURL
		where = "PostgreSQL"
	default:
		abs, err := filepath.Abs(*dir)
		if err == nil {
			err = os.MkdirAll(abs, 0o700)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "ferretdb-embed:", err)
			os.Exit(2)
		}
		config.Handler = "sqlite"
		config.SQLiteURL = "file:" + abs + "/"
		where = "SQLite in " + abs
	}

	f, err := ferretdb.New(config)
	if err != nil {
		fmt.Fprintln(os.Stderr, "ferretdb-embed:", err)
		os.Exit(1)
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	fmt.Fprintln(os.Stderr, "ferretdb-embed: listening on", *listen, "with", where)
	f.Run(ctx)
}
