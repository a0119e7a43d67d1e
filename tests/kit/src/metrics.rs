//! Reads the sidecar's Prometheus `/metrics` page: one scraper for every test.

use anyhow::Context;

/// One scrape of `/metrics`.
#[derive(Debug, Clone)]
pub struct Metrics {
    text: String,
}

impl Metrics {
    /// `GET http://<http_addr>/metrics`.
    pub async fn scrape(http_addr: &str) -> anyhow::Result<Self> {
        let url = format!("http://{http_addr}/metrics");
        let response = reqwest::get(&url)
            .await
            .with_context(|| format!("cannot GET {url}"))?
            .error_for_status()
            .with_context(|| format!("GET {url}"))?;
        let text = response
            .text()
            .await
            .with_context(|| format!("cannot read {url}"))?;
        Ok(Self { text })
    }

    /// A page already fetched (for example through an in-process router).
    pub fn from_text(text: impl Into<String>) -> Self {
        Self { text: text.into() }
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    /// The samples of metric `name` (exactly that name) whose labels include every one of
    /// `labels`, as (labels text, value).
    fn samples<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = f64> + 'a {
        self.text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(move |line| {
                let (series, value) = line.rsplit_once(' ')?;
                let (metric, label_text) = match series.split_once('{') {
                    Some((m, rest)) => (m, rest.strip_suffix('}')?),
                    None => (series, ""),
                };
                if metric != name {
                    return None;
                }
                let has = |(k, v): &(&str, &str)| {
                    label_text
                        .split(',')
                        .any(|pair| pair == format!("{k}=\"{v}\""))
                };
                if !labels.iter().all(has) {
                    return None;
                }
                value.parse::<f64>().ok()
            })
    }

    /// The sum of metric `name` over every series whose labels include `labels`; 0 if none.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples(name, labels).sum()
    }

    /// The value of metric `name` with those labels, if the page has such a series.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples(name, labels).next()
    }
}

impl std::fmt::Display for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::Metrics;

    #[test]
    fn reads_series_by_name_and_labels() {
        let m = Metrics::from_text(
            "# HELP x\ntollgate_holds_open 3\ntollgate_decisions_total{api=\"http\",outcome=\"granted\"} 2\n\
             tollgate_decisions_total{api=\"grpc\",outcome=\"granted\"} 5\n\
             tollgate_decisions_total_other 9\n",
        );
        assert_eq!(m.get("tollgate_holds_open", &[]), Some(3.0));
        assert_eq!(m.sum("tollgate_decisions_total", &[]), 7.0);
        assert_eq!(
            m.get("tollgate_decisions_total", &[("api", "grpc")]),
            Some(5.0)
        );
        assert_eq!(m.get("tollgate_decisions_total", &[("api", "ws")]), None);
        assert_eq!(m.sum("tollgate_missing", &[]), 0.0);
    }
}
