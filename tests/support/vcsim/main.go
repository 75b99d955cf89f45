// A vCenter simulator for LayerDesk's vSphere connector tests: govmomi's VPX model (one datacenter,
// one cluster of three hosts, one standalone host, a datastore, a port group, VMs) served over TLS.
//
// Usage: vcsim -listen 127.0.0.1:0 -user NAME -cert CERT.pem -key KEY.pem (the password comes in
// VCSIM_PASSWORD, never on the command line). It serves TLS with the given certificate (the test signs
// it with its own 2048-bit CA: Go's built-in test certificate is too weak for OpenSSL's defaults), prints
// its host:port on stdout and serves until stdin is closed.
package main

import (
	"crypto/tls"
	"flag"
	"fmt"
	"io"
	"log"
	"net/url"
	"os"

	"github.com/vmware/govmomi/simulator"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to serve on")
	user := flag.String("user", "administrator@vsphere.local", "the only user name accepted")
	certFile := flag.String("cert", "", "the server certificate (PEM)")
	keyFile := flag.String("key", "", "its private key (PEM)")
	flag.Parse()
	certificate, err := tls.LoadX509KeyPair(*certFile, *keyFile)
	if err != nil {
		log.Fatal(err)
	}

	model := simulator.VPX()
	if err := model.Create(); err != nil {
		log.Fatal(err)
	}
	defer model.Remove()
	model.Service.TLS = &tls.Config{Certificates: []tls.Certificate{certificate}, MinVersion: tls.VersionTLS12}
	model.Service.Listen = &url.URL{Host: *listen, User: url.UserPassword(*user, os.Getenv("VCSIM_PASSWORD"))}
	server := model.Service.NewServer()
	defer server.Close()
	fmt.Println(server.URL.Host)
	_, _ = io.Copy(io.Discard, os.Stdin) // the test session closes stdin to stop the simulator
}
