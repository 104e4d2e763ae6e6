//! `kvserve bench-serve --plot`: a PNG of a rate sweep, drawn with plotters' bitmap backend.
//!
//! Two panels over the request rates of the sweep (one evenly spaced point per rate, in the
//! order run, labelled with the rate, so `inf` has a place): output throughput (tokens/s), and
//! mean and p99 TTFT (ms).
//!
//! Text needs a font, and nothing is downloaded or bundled: [`system_font`] reads a TrueType
//! font from `$KVSERVE_PLOT_FONT` or from a list of well-known system paths (DejaVu Sans,
//! Liberation Sans, FreeSans, Noto Sans on Debian-, Fedora- and Arch-like systems; Arial on
//! macOS and Windows) and plotters draws it through `ab_glyph`. Without a usable font the plot
//! is drawn without any text (same panels, lines and point markers, no titles, ticks or legend),
//! and [`write_png`] says so in its [`PlotText`] so the caller can warn.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::FontStyle;

use super::serve::ServeReport;
use super::soak::SoakReport;

/// The font family the plot registers its font under.
const FAMILY: &str = "kvserve-plot";
/// Width and height of the image, pixels.
const SIZE: (u32, u32) = (1280, 520);

/// Fonts tried in order when `$KVSERVE_PLOT_FONT` is not set.
pub const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// Errors of [`write_png`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlotError {
    /// Nothing to plot.
    #[error("nothing to plot: the sweep has no run")]
    Empty,
    /// Drawing or writing the image failed.
    #[error("cannot write the plot {}: {reason}", path.display())]
    Draw {
        /// The image's path.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
}

/// Whether the plot has text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlotText {
    /// Titles, ticks and legend in the font read from this file.
    Font(PathBuf),
    /// No usable font was found: the plot has no text.
    None,
}

/// The plot font: `$KVSERVE_PLOT_FONT`, else the first of [`FONT_PATHS`] that ab_glyph can
/// read; registered with plotters once per process (its bytes live as long as the process).
pub fn system_font() -> Option<&'static Path> {
    static FONT: OnceLock<Option<PathBuf>> = OnceLock::new();
    FONT.get_or_init(|| {
        let from_env = std::env::var_os("KVSERVE_PLOT_FONT").map(PathBuf::from);
        let candidates = from_env
            .into_iter()
            .chain(FONT_PATHS.iter().map(PathBuf::from));
        for path in candidates {
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font(FAMILY, FontStyle::Normal, bytes).is_ok() {
                return Some(path);
            }
        }
        None
    })
    .as_deref()
}

/// Writes the plot of `runs` (a sweep, in the order run) to the PNG file `path`, with text when
/// [`system_font`] finds a font.
///
/// # Errors
/// [`PlotError::Empty`] for no run, [`PlotError::Draw`] naming the path when it cannot be
/// written.
pub fn write_png(path: &Path, runs: &[ServeReport]) -> Result<PlotText, PlotError> {
    let font = system_font();
    draw(path, runs, font.is_some())?;
    Ok(font.map_or(PlotText::None, |p| PlotText::Font(p.to_owned())))
}

/// One series: a name, a colour and a value per run.
struct Series {
    name: &'static str,
    color: RGBColor,
    values: Vec<f64>,
}

/// Refuses an empty plot, and a path that is a directory: plotters' bitmap backend would only
/// fail when presenting.
fn check_target(path: &Path, empty: bool) -> Result<(), PlotError> {
    if empty {
        return Err(PlotError::Empty);
    }
    if path.is_dir() {
        return Err(draw_error(path, &"it is a directory"));
    }
    Ok(())
}

/// Drawing or writing `path` failed with `e`.
fn draw_error(path: &Path, e: &dyn std::fmt::Display) -> PlotError {
    PlotError::Draw {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

fn draw(path: &Path, runs: &[ServeReport], text: bool) -> Result<(), PlotError> {
    check_target(path, runs.is_empty())?;
    let err = |e: &dyn std::fmt::Display| draw_error(path, e);
    let labels: Vec<String> = runs
        .iter()
        .map(|r| r.meta.request_rate.to_string())
        .collect();
    let throughput = [Series {
        name: "output tokens/s",
        color: BLUE,
        values: runs.iter().map(|r| r.stats.output_tokens_per_s).collect(),
    }];
    let ttft = [
        Series {
            name: "TTFT mean",
            color: GREEN,
            values: runs.iter().map(|r| r.stats.ttft.mean_ms).collect(),
        },
        Series {
            name: "TTFT p99",
            color: RED,
            values: runs.iter().map(|r| r.stats.ttft.p99_ms).collect(),
        },
    ];
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (left, right) = root.split_horizontally(SIZE.0 / 2);
    panel(
        &left,
        "Output throughput vs request rate",
        "tokens/s",
        &labels,
        &throughput,
        text,
    )
    .map_err(|e| err(&e))?;
    panel(
        &right,
        "Time to first token vs request rate",
        "ms",
        &labels,
        &ttft,
        text,
    )
    .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;
type DrawError = DrawingAreaErrorKind<<BitMapBackend<'static> as DrawingBackend>::ErrorType>;
type DrawResult = Result<(), DrawError>;

/// A chart with f64 axes on a bitmap area.
type Chart<'a, 'b> = ChartContext<
    'a,
    BitMapBackend<'b>,
    plotters::coord::cartesian::Cartesian2d<
        plotters::coord::types::RangedCoordf64,
        plotters::coord::types::RangedCoordf64,
    >,
>;

/// The top of a panel's y axis: 15% above the largest finite value (1 when there is none).
fn y_top(values: impl Iterator<Item = f64>) -> f64 {
    let top = values.filter(|v| v.is_finite()).fold(0.0f64, f64::max);
    if top > 0.0 { top * 1.15 } else { 1.0 }
}

/// A panel's chart over `x` × `0..y_max`: titled, with room for tick labels when there is
/// text; else a bare frame (the caller draws the mesh when there is text).
fn frame<'a, 'b>(
    area: &'a Area<'b>,
    title: &str,
    x: std::ops::Range<f64>,
    y_max: f64,
    text: bool,
) -> Result<Chart<'a, 'b>, DrawError> {
    let mut builder = ChartBuilder::on(area);
    builder.margin(16);
    if text {
        builder
            .caption(title, (FAMILY, 22))
            .x_label_area_size(44)
            .y_label_area_size(70);
    }
    let (x0, x1) = (x.start, x.end);
    let chart = builder.build_cartesian_2d(x, 0f64..y_max)?;
    if !text {
        chart.plotting_area().draw(&Rectangle::new(
            [(x0, 0.0), (x1, y_max)],
            BLACK.stroke_width(1),
        ))?;
    }
    Ok(chart)
}

/// Draws a line of `points` (with round marks when `marks`), named in the legend when there
/// is text.
fn line(
    chart: &mut Chart<'_, '_>,
    name: &'static str,
    color: RGBColor,
    points: &[(f64, f64)],
    style: LineStyle,
    text: bool,
) -> DrawResult {
    let drawn = match style {
        LineStyle::Marks => {
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))?
        }
        LineStyle::Line | LineStyle::LineAndMarks => chart.draw_series(LineSeries::new(
            points.iter().copied(),
            color.stroke_width(2),
        ))?,
    };
    if text {
        drawn
            .label(name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2)));
    }
    if style == LineStyle::LineAndMarks {
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
    }
    Ok(())
}

/// How [`line`] draws its points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LineStyle {
    Line,
    Marks,
    LineAndMarks,
}

/// The legend box, when there is text.
fn legend<'a, 'b: 'a>(
    chart: &mut Chart<'a, 'b>,
    position: SeriesLabelPosition,
    text: bool,
) -> DrawResult {
    if text {
        chart
            .configure_series_labels()
            .position(position)
            .label_font((FAMILY, 14))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    Ok(())
}

/// One panel: `series` over the runs, x = the run's index, labelled with its rate.
fn panel(
    area: &Area<'_>,
    title: &str,
    unit: &str,
    labels: &[String],
    series: &[Series],
    text: bool,
) -> DrawResult {
    let y_max = y_top(series.iter().flat_map(|s| s.values.iter().copied()));
    let x_max = labels.len() as f64 - 0.5;
    let mut chart = frame(area, title, -0.5f64..x_max, y_max, text)?;
    if text {
        chart
            .configure_mesh()
            .x_labels(labels.len())
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 1e-6 && i >= 0.0 {
                    labels.get(i as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|y| format!("{y:.0}"))
            .x_desc("request rate (req/s)")
            .y_desc(unit)
            .label_style((FAMILY, 14))
            .axis_desc_style((FAMILY, 16))
            .draw()?;
    }
    for s in series {
        let points: Vec<(f64, f64)> = s
            .values
            .iter()
            .enumerate()
            .map(|(i, &v)| (i as f64, if v.is_finite() { v } else { 0.0 }))
            .collect();
        line(
            &mut chart,
            s.name,
            s.color,
            &points,
            LineStyle::LineAndMarks,
            text,
        )?;
    }
    legend(&mut chart, SeriesLabelPosition::UpperLeft, text)
}

/// Width and height of the soak plot, pixels.
const SOAK_SIZE: (u32, u32) = (1280, 760);

/// Writes the curve of a soak (`kvserve soak --plot`) to the PNG file `path`: resident memory
/// and open file descriptors over time (the idle points marked), then KV blocks used and the
/// client's requests in flight. Text as for [`write_png`].
///
/// # Errors
/// [`PlotError::Empty`] for no sample, [`PlotError::Draw`] naming the path.
pub fn write_soak_png(path: &Path, report: &SoakReport) -> Result<PlotText, PlotError> {
    let font = system_font();
    draw_soak(path, report, font.is_some())?;
    Ok(font.map_or(PlotText::None, |p| PlotText::Font(p.to_owned())))
}

fn draw_soak(path: &Path, report: &SoakReport, text: bool) -> Result<(), PlotError> {
    check_target(path, report.samples.is_empty())?;
    let err = |e: &dyn std::fmt::Display| draw_error(path, e);
    let minutes = |t: f64| t / 60.0;
    let t_max = report
        .samples
        .iter()
        .map(|s| minutes(s.t_s))
        .fold(0.0f64, f64::max)
        .max(1.0 / 60.0);
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let rss: Vec<(f64, f64)> = report
        .samples
        .iter()
        .filter_map(|s| s.rss_bytes.map(|r| (minutes(s.t_s), mib(r))))
        .collect();
    let idle: Vec<(f64, f64)> = report
        .idle_points
        .iter()
        .filter_map(|p| p.sample.rss_bytes.map(|r| (minutes(p.sample.t_s), mib(r))))
        .collect();
    let fds: Vec<(f64, f64)> = report
        .samples
        .iter()
        .filter_map(|s| s.open_fds.map(|n| (minutes(s.t_s), n as f64)))
        .collect();
    let kv: Vec<(f64, f64)> = report
        .samples
        .iter()
        .map(|s| (minutes(s.t_s), s.kv_blocks_used as f64))
        .collect();
    let in_flight: Vec<(f64, f64)> = report
        .samples
        .iter()
        .map(|s| (minutes(s.t_s), s.client_in_flight as f64))
        .collect();
    let root = BitMapBackend::new(path, SOAK_SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (top, bottom) = root.split_vertically(SOAK_SIZE.1 / 2);
    let memory = [
        Curve {
            name: "server RSS (MiB)",
            color: BLUE,
            points: &rss,
            marks: false,
        },
        Curve {
            name: "RSS at the end of an idle phase",
            color: RED,
            points: &idle,
            marks: true,
        },
        Curve {
            name: "open file descriptors",
            color: MAGENTA,
            points: &fds,
            marks: false,
        },
    ];
    time_panel(
        &top,
        "Soak: server memory and file descriptors",
        "MiB / count",
        t_max,
        &memory,
        text,
    )
    .map_err(|e| err(&e))?;
    let load = [
        Curve {
            name: "KV blocks used",
            color: BLUE,
            points: &kv,
            marks: false,
        },
        Curve {
            name: "client requests in flight",
            color: GREEN,
            points: &in_flight,
            marks: false,
        },
    ];
    time_panel(
        &bottom,
        "Soak: KV cache and load",
        "count",
        t_max,
        &load,
        text,
    )
    .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}

/// One curve over time: points (minutes, value), drawn as a line or as marks.
struct Curve<'a> {
    name: &'static str,
    color: RGBColor,
    points: &'a [(f64, f64)],
    marks: bool,
}

fn time_panel(
    area: &Area<'_>,
    title: &str,
    unit: &str,
    t_max: f64,
    curves: &[Curve<'_>],
    text: bool,
) -> DrawResult {
    let y_max = y_top(curves.iter().flat_map(|c| c.points.iter().map(|p| p.1)));
    let mut chart = frame(area, title, 0f64..t_max, y_max, text)?;
    if text {
        chart
            .configure_mesh()
            .x_desc("minutes")
            .y_desc(unit)
            .y_label_formatter(&|y| format!("{y:.0}"))
            .label_style((FAMILY, 14))
            .axis_desc_style((FAMILY, 16))
            .draw()?;
    }
    for c in curves {
        let style = if c.marks {
            LineStyle::Marks
        } else {
            LineStyle::Line
        };
        line(&mut chart, c.name, c.color, c.points, style, text)?;
    }
    legend(&mut chart, SeriesLabelPosition::LowerRight, text)
}

#[cfg(test)]
pub(super) mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A PNG file starts with these 8 bytes.
    pub(crate) const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1A, b'\n'];

    #[test]
    fn nothing_to_plot_and_unwritable_paths_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            write_png(&dir.path().join("x.png"), &[]),
            Err(PlotError::Empty)
        );
        let run = crate::bench::serve::tests::report_fixture();
        for bad in [dir.path().to_owned(), dir.path().join("missing/x.png")] {
            let err = draw(&bad, std::slice::from_ref(&run), false).unwrap_err();
            assert!(
                matches!(&err, PlotError::Draw { path, .. } if *path == bad),
                "{err:?}"
            );
            assert!(
                err.to_string().contains(&bad.display().to_string()),
                "{err}"
            );
        }
    }

    #[test]
    fn a_plot_without_a_font_is_a_png_without_text() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no-text.png");
        let mut runs = vec![crate::bench::serve::tests::report_fixture(); 3];
        runs[2].meta.request_rate = super::super::serve::RequestRate::INFINITE;
        runs[1].stats.ttft.p99_ms = f64::NAN;
        draw(&path, &runs, false).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes[..8], PNG_SIGNATURE);
    }
}
