// A Go net/http client for tests/test_go_client.py: the standard library only, so it builds
// with GOPROXY=off and no module download.
//
// Usage: h2client PROXY_URL CA_FILE URL...
// For each URL: a GET with "TE: trailers" through the proxy (CONNECT), trusting only CA_FILE,
// HTTP/2 attempted as Go does by default. Prints one JSON object per URL, in order.
package main

import (
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"time"
)

type result struct {
	Proto    string            `json:"proto"`
	Status   int               `json:"status"`
	Length   int               `json:"length"`
	Sha256   string            `json:"sha256"`
	Trailers map[string]string `json:"trailers"`
}

func main() {
	if len(os.Args) < 4 {
		fmt.Fprintln(os.Stderr, "usage: h2client PROXY_URL CA_FILE URL...")
		os.Exit(2)
	}
	proxy, err := url.Parse(os.Args[1])
	check(err)
	pem, err := os.ReadFile(os.Args[2])
	check(err)
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		check(fmt.Errorf("no certificate in %s", os.Args[2]))
	}
	transport := &http.Transport{
		Proxy:             http.ProxyURL(proxy),
		TLSClientConfig:   &tls.Config{RootCAs: roots},
		ForceAttemptHTTP2: true, // a custom TLS config turns HTTP/2 off unless asked for
	}
	client := &http.Client{Transport: transport, Timeout: 20 * time.Second}
	results := []result{}
	for _, target := range os.Args[3:] {
		request, err := http.NewRequest("GET", target, nil)
		check(err)
		request.Header.Set("TE", "trailers")
		response, err := client.Do(request)
		check(err)
		body, err := io.ReadAll(response.Body)
		check(err)
		check(response.Body.Close())
		digest := sha256.Sum256(body)
		trailers := map[string]string{}
		for name := range response.Trailer {
			trailers[name] = response.Trailer.Get(name)
		}
		results = append(results, result{
			response.Proto, response.StatusCode, len(body), hex.EncodeToString(digest[:]), trailers,
		})
	}
	check(json.NewEncoder(os.Stdout).Encode(results))
}

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
