//! Who is asking: the client address behind trusted proxies, the rate-limit key (an IPv6
//! /64 counts as one client) and whether a request came from another site.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use axum::extract::{ConnectInfo, Request};
use axum::http::{HeaderMap, HeaderValue, header};

/// The client address as decided by [`client_ip`], for handlers.
#[derive(Debug, Clone, Copy)]
pub struct ClientIp(pub IpAddr);

/// The key a client is rate-limited under: an IPv4 address, or the /64 of an IPv6 address
/// (one subscriber line gets a whole /64, so the full address would limit nothing).
pub fn rate_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(std::net::Ipv6Addr::from(bits))
        }
        v4 => v4,
    }
}

/// `scheme://host[:port]` of a URL, lower-case, without the scheme's default port: the form
/// browsers send in `Origin`.
pub fn origin_of(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let scheme = scheme.to_ascii_lowercase();
    let authority = rest
        .split(['/', '?', '#'])
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    let authority = match (scheme.as_str(), authority.rsplit_once(':')) {
        ("https", Some((host, "443"))) | ("http", Some((host, "80"))) => host.to_owned(),
        _ => authority,
    };
    format!("{scheme}://{authority}")
}

/// `server.trusted_proxies` in canonical form (an IPv4-mapped IPv6 address as IPv4), as
/// [`client_ip`] compares them.
pub fn trusted_proxies(server: &optinsync_engine::config::ServerConfig) -> Vec<IpAddr> {
    server
        .trusted_proxies
        .iter()
        .map(|ip| ip.to_canonical())
        .collect()
}

/// The client of a request: [`client_ip`] of the connection's peer (`ConnectInfo`) and the
/// request's `X-Forwarded-For`.
pub fn request_client(req: &Request, trusted: &[IpAddr]) -> IpAddr {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    client_ip(peer, req.headers(), trusted)
}

/// The client's address: the peer, unless the peer is a trusted proxy, in which case the
/// right-most `X-Forwarded-For` entry that is not itself a trusted proxy.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpAddr]) -> IpAddr {
    let peer = peer.to_canonical();
    if !trusted.contains(&peer) {
        return peer;
    }
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let mut ip = peer;
    for hop in hops.iter().rev() {
        match hop.parse::<IpAddr>() {
            Ok(h) => {
                ip = h.to_canonical();
                if !trusted.contains(&ip) {
                    return ip;
                }
            }
            Err(_) => return ip,
        }
    }
    ip
}

/// Why a confirm `POST` comes from another site, if it does: an `Origin` other than the
/// public URL's, or the browser's own `Sec-Fetch-Site: cross-site`. `Origin: null` says
/// nothing (our pages' `Referrer-Policy: no-referrer` makes browsers send it for our own
/// button), and requests without either header (older browsers, privacy tools) are judged by
/// the page nonce alone, as before.
pub fn cross_site(headers: &HeaderMap, public_origin: &str) -> Option<&'static str> {
    let text = |h| headers.get(h).and_then(|v: &HeaderValue| v.to_str().ok());
    if text("sec-fetch-site").is_some_and(|v| v.trim().eq_ignore_ascii_case("cross-site")) {
        return Some("Sec-Fetch-Site: cross-site");
    }
    match headers
        .get(header::ORIGIN)
        .map(|v| v.to_str().map(str::trim))
    {
        None | Some(Ok("null")) => None,
        Some(Ok(o)) if origin_of(o) == public_origin => None,
        Some(_) => Some("Origin is not the public URL's"),
    }
}
