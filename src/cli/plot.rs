//! A scatter plot as PNG, drawn with the `image` crate and a 5×7 pixel font:
//! enough for `tune`'s speed-against-drop figure without a plotting library.

use image::{Rgb, RgbImage};

/// One point: where it goes, its colour, a short label, and whether it is
/// the one to point out (drawn larger, ringed).
pub struct Point {
    pub x: f64,
    pub y: f64,
    pub color: [u8; 3],
    pub label: String,
    pub marked: bool,
}

/// What to draw: points, axis titles, an optional horizontal line (the
/// budget), and a legend of (colour, text).
pub struct Figure {
    pub title: String,
    pub x_title: String,
    pub y_title: String,
    pub points: Vec<Point>,
    pub hline: Option<(f64, String)>,
    pub legend: Vec<([u8; 3], String)>,
}

const WIDTH: u32 = 760;
const HEIGHT: u32 = 500;
/// The plot area inside the image: left, top, right, bottom.
const AREA: (i64, i64, i64, i64) = (70, 40, 740, 440);
const BLACK: [u8; 3] = [0, 0, 0];
const GREY: [u8; 3] = [200, 200, 200];

/// Draws `fig` and encodes it as PNG bytes.
pub fn png(fig: &Figure) -> Result<Vec<u8>, image::ImageError> {
    let mut img = RgbImage::from_pixel(WIDTH, HEIGHT, Rgb([255, 255, 255]));
    let (x_lo, x_hi) = padded_range(fig.points.iter().map(|p| p.x));
    let ys = fig.points.iter().map(|p| p.y).chain(fig.hline.as_ref().map(|h| h.0));
    let (y_lo, y_hi) = padded_range(ys);
    let (l, t, r, b) = AREA;
    let px = |x: f64| l + ((x - x_lo) / (x_hi - x_lo) * (r - l) as f64).round() as i64;
    let py = |y: f64| b - ((y - y_lo) / (y_hi - y_lo) * (b - t) as f64).round() as i64;

    for (lo, hi, horizontal) in [(x_lo, x_hi, false), (y_lo, y_hi, true)] {
        for tick in ticks(lo, hi) {
            let text = tick_label(tick, hi - lo);
            if horizontal {
                line(&mut img, (l, py(tick)), (r, py(tick)), GREY, false);
                text_at(&mut img, l - 6 - text_width(&text), py(tick) - 3, &text, BLACK);
            } else {
                line(&mut img, (px(tick), t), (px(tick), b), GREY, false);
                text_at(&mut img, px(tick) - text_width(&text) / 2, b + 8, &text, BLACK);
            }
        }
    }
    line(&mut img, (l, b), (r, b), BLACK, false);
    line(&mut img, (l, t), (l, b), BLACK, false);
    if let Some((y, label)) = &fig.hline {
        line(&mut img, (l, py(*y)), (r, py(*y)), [200, 30, 30], true);
        text_at(&mut img, r - text_width(label), py(*y) - 10, label, [200, 30, 30]);
    }
    for p in &fig.points {
        let (cx, cy) = (px(p.x), py(p.y));
        disc(&mut img, cx, cy, if p.marked { 6 } else { 4 }, p.color);
        if p.marked {
            ring(&mut img, cx, cy, 10, [200, 30, 30]);
        }
        text_at(&mut img, cx + 8, cy - 10, &p.label, if p.marked { [200, 30, 30] } else { [90, 90, 90] });
    }
    text_at(&mut img, (WIDTH as i64 - text_width(&fig.title)) / 2, 14, &fig.title, BLACK);
    text_at(&mut img, (l + r - text_width(&fig.x_title)) / 2, b + 26, &fig.x_title, BLACK);
    text_at(&mut img, 8, t - 22, &fig.y_title, BLACK);
    let mut y = t + 8;
    for (color, text) in &fig.legend {
        disc(&mut img, l + 16, y + 3, 4, *color);
        text_at(&mut img, l + 26, y, text, BLACK);
        y += 14;
    }
    let mut bytes = Vec::new();
    image::DynamicImage::ImageRgb8(img).write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)?;
    Ok(bytes)
}

/// The values' range widened by 8% on each side (and to a unit span when
/// all values are equal), so that no point sits on the frame.
fn padded_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.filter(|v| v.is_finite()).fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let span = if hi - lo > 1e-9 { hi - lo } else { 1.0 };
    (lo - 0.08 * span, hi + 0.08 * span)
}

/// Round tick values about a fifth of the range apart, between `lo` and `hi`.
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let raw = (hi - lo) / 5.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let closest = |a: &f64, b: &f64| (a / raw).ln().abs().total_cmp(&(b / raw).ln().abs());
    let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * magnitude).min_by(closest).unwrap_or(magnitude);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last).map(|k| k as f64 * step).collect()
}

fn tick_label(v: f64, span: f64) -> String {
    let decimals = if span >= 5.0 { 0 } else if span >= 0.5 { 1 } else if span >= 0.05 { 2 } else { 3 };
    let text = format!("{v:.decimals$}");
    if text.trim_start_matches('-').chars().all(|c| c == '0' || c == '.') { text.trim_start_matches('-').to_string() } else { text }
}

fn put(img: &mut RgbImage, x: i64, y: i64, color: [u8; 3]) {
    if (0..img.width() as i64).contains(&x) && (0..img.height() as i64).contains(&y) {
        img.put_pixel(x as u32, y as u32, Rgb(color));
    }
}

/// A horizontal or vertical line (the only kinds a scatter plot needs).
fn line(img: &mut RgbImage, from: (i64, i64), to: (i64, i64), color: [u8; 3], dashed: bool) {
    let steps = (to.0 - from.0).abs().max((to.1 - from.1).abs());
    for i in 0..=steps {
        if dashed && (i / 6) % 2 == 1 {
            continue;
        }
        let x = from.0 + (to.0 - from.0) * i / steps.max(1);
        let y = from.1 + (to.1 - from.1) * i / steps.max(1);
        put(img, x, y, color);
    }
}

fn disc(img: &mut RgbImage, cx: i64, cy: i64, radius: i64, color: [u8; 3]) {
    for dy in -radius..=radius {
        for dx in -radius..=radius {
            if dx * dx + dy * dy <= radius * radius {
                put(img, cx + dx, cy + dy, color);
            }
        }
    }
}

fn ring(img: &mut RgbImage, cx: i64, cy: i64, radius: i64, color: [u8; 3]) {
    for dy in -radius..=radius {
        for dx in -radius..=radius {
            let d = dx * dx + dy * dy;
            if d <= radius * radius && d >= (radius - 2) * (radius - 2) {
                put(img, cx + dx, cy + dy, color);
            }
        }
    }
}

/// Width in pixels of `text` in the 5×7 font (6 pixels per character).
fn text_width(text: &str) -> i64 {
    6 * text.chars().count() as i64
}

/// Writes `text` with its top-left corner at (x, y); lowercase letters are
/// drawn as capitals, characters the font lacks as blanks.
fn text_at(img: &mut RgbImage, x: i64, y: i64, text: &str, color: [u8; 3]) {
    for (i, c) in text.chars().enumerate() {
        let Some(rows) = glyph(c.to_ascii_uppercase()) else { continue };
        for (dy, row) in rows.iter().enumerate() {
            for dx in 0..5 {
                if row & (0b10000 >> dx) != 0 {
                    put(img, x + 6 * i as i64 + dx, y + dy as i64, color);
                }
            }
        }
    }
}

/// The 5×7 glyph of `c`: seven rows, the leftmost pixel in bit 4.
fn glyph(c: char) -> Option<[u8; 7]> {
    Some(match c {
        '0' => [14, 17, 19, 21, 25, 17, 14],
        '1' => [4, 12, 4, 4, 4, 4, 14],
        '2' => [14, 17, 1, 2, 4, 8, 31],
        '3' => [30, 1, 1, 14, 1, 1, 30],
        '4' => [2, 6, 10, 18, 31, 2, 2],
        '5' => [31, 16, 30, 1, 1, 17, 14],
        '6' => [6, 8, 16, 30, 17, 17, 14],
        '7' => [31, 1, 2, 4, 8, 8, 8],
        '8' => [14, 17, 17, 14, 17, 17, 14],
        '9' => [14, 17, 17, 15, 1, 2, 12],
        'A' => [14, 17, 17, 31, 17, 17, 17],
        'B' => [30, 17, 17, 30, 17, 17, 30],
        'C' => [14, 17, 16, 16, 16, 17, 14],
        'D' => [28, 18, 17, 17, 17, 18, 28],
        'E' => [31, 16, 16, 30, 16, 16, 31],
        'F' => [31, 16, 16, 30, 16, 16, 16],
        'G' => [14, 17, 16, 23, 17, 17, 15],
        'H' => [17, 17, 17, 31, 17, 17, 17],
        'I' => [14, 4, 4, 4, 4, 4, 14],
        'J' => [7, 2, 2, 2, 2, 18, 12],
        'K' => [17, 18, 20, 24, 20, 18, 17],
        'L' => [16, 16, 16, 16, 16, 16, 31],
        'M' => [17, 27, 21, 21, 17, 17, 17],
        'N' => [17, 17, 25, 21, 19, 17, 17],
        'O' => [14, 17, 17, 17, 17, 17, 14],
        'P' => [30, 17, 17, 30, 16, 16, 16],
        'Q' => [14, 17, 17, 17, 21, 18, 13],
        'R' => [30, 17, 17, 30, 20, 18, 17],
        'S' => [15, 16, 16, 14, 1, 1, 30],
        'T' => [31, 4, 4, 4, 4, 4, 4],
        'U' => [17, 17, 17, 17, 17, 17, 14],
        'V' => [17, 17, 17, 17, 17, 10, 4],
        'W' => [17, 17, 17, 21, 21, 21, 10],
        'X' => [17, 17, 10, 4, 10, 17, 17],
        'Y' => [17, 17, 10, 4, 4, 4, 4],
        'Z' => [31, 1, 2, 4, 8, 16, 31],
        '.' => [0, 0, 0, 0, 0, 12, 12],
        ',' => [0, 0, 0, 0, 12, 4, 8],
        ':' => [0, 12, 12, 0, 12, 12, 0],
        '-' => [0, 0, 0, 31, 0, 0, 0],
        '+' => [0, 4, 4, 31, 4, 4, 0],
        '=' => [0, 0, 31, 0, 31, 0, 0],
        '%' => [24, 25, 2, 4, 8, 19, 3],
        '(' => [2, 4, 8, 8, 8, 4, 2],
        ')' => [8, 4, 2, 2, 2, 4, 8],
        '/' => [0, 1, 2, 4, 8, 16, 0],
        '<' => [2, 4, 8, 16, 8, 4, 2],
        '>' => [8, 4, 2, 1, 2, 4, 8],
        '_' => [0, 0, 0, 0, 0, 0, 31],
        ' ' => [0; 7],
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_inside_the_range() {
        let t = ticks(0.9, 2.1);
        let want = [1.0, 1.2, 1.4, 1.6, 1.8, 2.0];
        assert!(t.len() == want.len() && t.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-12), "{t:?}");
        assert_eq!(ticks(-3.0, 40.0), vec![0.0, 10.0, 20.0, 30.0, 40.0]);
    }

    #[test]
    fn a_figure_encodes_as_png_with_every_point_drawn() {
        let points = vec![
            Point { x: 1.0, y: 0.0, color: [0, 0, 255], label: "r0".into(), marked: false },
            Point { x: 1.8, y: 2.5, color: [0, 0, 255], label: "r16".into(), marked: true },
        ];
        let fig = Figure { title: "t".into(), x_title: "x".into(), y_title: "y".into(), points, hline: Some((1.0, "budget".into())), legend: vec![] };
        let img = image::load_from_memory(&png(&fig).unwrap()).unwrap().to_rgb8();
        assert_eq!((img.width(), img.height()), (WIDTH, HEIGHT));
        let blue = img.pixels().filter(|p| p.0 == [0, 0, 255]).count();
        assert!(blue > 2 * 30, "both discs drawn: {blue} blue pixels");
    }
}
