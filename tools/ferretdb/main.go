// Command ferretdb-embed runs FerretDB v1.24.2 with the SQLite backend for m365sync's
// development and test machines.
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
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/FerretDB/FerretDB/ferretdb"
)

func main() {
	listen := flag.String("listen-addr", "127.0.0.1:27017", "TCP address to accept MongoDB wire protocol connections on")
	dir := flag.String("sqlite-dir", "", "existing directory that holds one SQLite file per database")
	flag.Parse()

	if *dir == "" {
		fmt.Fprintln(os.Stderr, "ferretdb-embed: -sqlite-dir is required")
		os.Exit(2)
	}
	abs, err := filepath.Abs(*dir)
	if err != nil {
		fmt.Fprintln(os.Stderr, "ferretdb-embed:", err)
		os.Exit(2)
	}
	if err := os.MkdirAll(abs, 0o700); err != nil {
		fmt.Fprintln(os.Stderr, "ferretdb-embed:", err)
		os.Exit(2)
	}

	f, err := ferretdb.New(&ferretdb.Config{
		Listener:  ferretdb.ListenerConfig{TCP: *listen},
		Handler:   "sqlite",
		SQLiteURL: "file:" + abs + "/",
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "ferretdb-embed:", err)
		os.Exit(1)
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	fmt.Fprintln(os.Stderr, "ferretdb-embed: listening on", *listen, "with SQLite in", abs)
	f.Run(ctx)
}
